"""GLUE SST-2 TSV reading: the real format, and one clear error for each way a file can be wrong."""
import pytest

from hpml.data import sst2
from hpml.errors import HpmlError

from conftest import SST2_REAL


def write(tmp_path, text, name="train.tsv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_reads_glue_format_with_quotes_and_trailing_space(tmp_path):
    rows = sst2.read_tsv(write(tmp_path, 'sentence\tlabel\nit \'s "great" \t1\ndull , flat \t0\n'))
    assert rows == {"sentence": ["it 's \"great\"", "dull , flat"], "label": [1, 0]}


@pytest.mark.parametrize("text,message", [
    ("text\tlabel\na\t1\n", "header is \\['text', 'label'\\]"),
    ("sentence\tlabel\ngood\t2\n", "train.tsv:2: expected 'sentence<TAB>0\\|1'"),
    ("sentence\tlabel\ngood\n", "train.tsv:2"),
    ("sentence\tlabel\n", "no rows after the header"),
])
def test_malformed_files_raise_one_line(tmp_path, text, message):
    with pytest.raises(HpmlError, match=message) as err:
        sst2.read_tsv(write(tmp_path, text))
    assert "\n" not in str(err.value)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(HpmlError, match="dev.tsv not found.*hpml make-data sst2"):
        sst2.load_sst2(str(tmp_path), "validation")


def test_max_samples_takes_the_first_rows(sst2_dir):
    ds = sst2.load_sst2(str(sst2_dir), "train", 10)
    full = sst2.read_tsv(str(sst2_dir / "train.tsv"))
    assert ds["sentence"] == full["sentence"][:10]


@pytest.mark.skipif(not SST2_REAL.exists(), reason="../shared/data/sst2 is absent")
def test_real_glue_files_parse_completely():
    train = sst2.read_tsv(str(SST2_REAL / "train.tsv"))
    dev = sst2.read_tsv(str(SST2_REAL / "dev.tsv"))
    assert (len(train["label"]), sum(train["label"])) == (67349, 37569)
    assert (len(dev["label"]), sum(dev["label"])) == (872, 444)
