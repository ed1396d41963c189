"""MNLI TSV reading: GLUE's full files (columns found by name) and generated ones; bad rows in one line."""
import pytest

from hpml.data import mnli, synthetic
from hpml.errors import HpmlError

GLUE_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")


def test_reads_glue_columns_by_name(tmp_path):
    row = "0\t1\t1e\tfiction\t(x)\t(y)\t(X)\t(Y)\tA man sleeps .\tA person rests .\tentailment\tentailment"
    bad = row.replace("\tentailment\tentailment", "\tentailment\tmaybe")
    path = tmp_path / "dev_matched.tsv"
    path.write_text(f"{GLUE_HEADER}\n{row}\n{row.replace('entailment', 'contradiction')}\n")
    assert mnli.read_tsv(str(path)) == {"premise": ["A man sleeps .", "A man sleeps ."],
                                        "hypothesis": ["A person rests .", "A person rests ."], "label": [0, 2]}
    path.write_text(f"{GLUE_HEADER}\n{row}\n{bad}\n")
    with pytest.raises(HpmlError, match=r"dev_matched.tsv:3: expected 12 tab-separated fields with gold_label one of"):
        mnli.read_tsv(str(path))
    path.write_text("premise\thypothesis\tlabel\nx\ty\t0\n")
    with pytest.raises(HpmlError, match="header lacks sentence1, sentence2, gold_label"):
        mnli.read_tsv(str(path))


def test_generated_pairs_are_balanced_and_split_apart(tmp_path):
    train, dev = synthetic.write_mnli(str(tmp_path), 30, 12, seed=3)
    rows = mnli.read_tsv(dev)
    assert sorted(rows["label"]) == [0] * 4 + [1] * 4 + [2] * 4
    assert set(zip(rows["premise"], rows["hypothesis"])) != set(zip(*[mnli.read_tsv(train)[k][:12]
                                                                      for k in ("premise", "hypothesis")]))
