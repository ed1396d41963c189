"""SST-2 as a task spec: single sentences, 2 labels, accuracy; requests {"text": …}."""
from hpml.config import SST2_PARAMS
from hpml.tasks.classification import classification_spec


def _load(data_dir, split, max_samples, revision):
    from hpml.data import sst2

    return sst2.load_sst2(data_dir, split, max_samples, revision)


def _make_data(out_dir, n_train, n_dev, seed):
    from hpml.data import synthetic

    return synthetic.write_sst2(out_dir, n_train, n_dev, seed)


SPEC = classification_spec(
    name="sst2", title="SST-2", labels=2, params=SST2_PARAMS, data_columns=("sentence",), input_columns=("text",),
    load=_load, files=("train.tsv", "dev.tsv"), hub="nyu-mll/glue/sst2", hub_repo="nyu-mll/glue",
    make_data=_make_data, make_data_sizes=(4000, 500))
