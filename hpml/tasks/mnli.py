"""MNLI-format natural language inference as a task spec: premise/hypothesis pairs, 3 labels (0 entailment,
1 neutral, 2 contradiction), accuracy on the matched dev set; requests {"premise": …, "hypothesis": …}."""
from hpml.config import MNLI_PARAMS
from hpml.tasks.classification import classification_spec


def _load(data_dir, split, max_samples, revision):
    from hpml.data import mnli

    return mnli.load_mnli(data_dir, split, max_samples, revision)


def _make_data(out_dir, n_train, n_dev, seed):
    from hpml.data import synthetic

    return synthetic.write_mnli(out_dir, n_train, n_dev, seed)


SPEC = classification_spec(
    name="mnli", title="MNLI", labels=3, params=MNLI_PARAMS, data_columns=("premise", "hypothesis"),
    input_columns=("premise", "hypothesis"), load=_load, files=("train.tsv", "dev_matched.tsv"),
    hub="nyu-mll/glue/mnli", hub_repo="nyu-mll/glue", make_data=_make_data, make_data_sizes=(3000, 600))
