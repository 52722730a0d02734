"""Document sources: every scheme, and clear errors or counted skips on bad input."""

import gzip
import json

from array_record.python.array_record_module import ArrayRecordWriter
import pytest

from maxlm.data import sources
from maxlm.data.sources import make_source


def write(path, data: str | bytes):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def docs(source):
    return [source[i] for i in range(len(source))]


# --- text --------------------------------------------------------------------------------


def test_text_one_document_per_file(tmp_path):
    write(tmp_path / "b.txt", "second\nfile\n")
    write(tmp_path / "a.txt", "first  file\n\nwith a blank line\n")
    src = make_source(f"text:{tmp_path}/*.txt")
    assert docs(src) == ["first  file\n\nwith a blank line\n", "second\nfile\n"]  # sorted by path
    assert src.report["documents"] == 2 and src.report["skipped"] == {}


def test_text_blank_line_blocks(tmp_path):
    write(tmp_path / "a.txt", "one\ntwo\n\nthree\n \t\nfour\n\n\n")
    src = make_source(f"text:{tmp_path}/a.txt", text_split="blank_line")
    assert docs(src) == ["one\ntwo", "three", "four"]
    assert src.report["skipped"] == {"empty": 1}  # the block between the last blank lines


def test_builtin_tinyshakespeare():
    src = make_source("builtin:tinyshakespeare")
    assert len(src) == 1 and len(src[0]) == 1_115_394
    assert src[0].startswith("First Citizen:")


# --- jsonl -------------------------------------------------------------------------------


def test_jsonl_default_and_named_field_and_gzip(tmp_path):
    lines = [{"text": "hello", "other": "x"}, {"text": "世界 🙂", "other": "y"}]
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped", "other": "z"}) + "\n")
    assert docs(make_source(f"jsonl:{tmp_path}/a.jsonl")) == ["hello", "世界 🙂"]
    assert docs(make_source(f"jsonl:{tmp_path}/*.jsonl*#other")) == ["x", "y", "z"]


def test_builtin_hh_rlhf_field():
    src = make_source("builtin:hh_rlhf_harmless_test#chosen")
    assert len(src) == 2312 and "Human:" in src[0]


def test_load_jsonl_keeps_whole_records(tmp_path):
    write(tmp_path / "p.jsonl", '{"chosen": "a", "rejected": "b", "n": 1}\n')
    assert sources.load_jsonl(str(tmp_path / "p.jsonl"), fields=("chosen", "rejected")) == [
        {"chosen": "a", "rejected": "b", "n": 1}
    ]


# --- tfds (array_record, no TensorFlow) ---------------------------------------------------

tfds = pytest.importorskip("tensorflow_datasets")


class TinyDocs(tfds.core.GeneratorBasedBuilder):
    """A two-split text dataset built offline in the test."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"text": f"document {i} 世界", "title": f"title {i}"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    TinyDocs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_source(tfds_dir):
    train = make_source(f"tfds:tiny_docs:train@{tfds_dir}")
    assert sorted(docs(train)) == [f"document {i} 世界" for i in range(6)]
    assert sorted(docs(make_source(f"tfds:tiny_docs:test@{tfds_dir}#title"))) == ["title 0", "title 1"]
    assert len(make_source(f"tfds:tiny_docs:train[:50%]@{tfds_dir}")) == 3


def test_tfds_errors(tfds_dir):
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        make_source(f"tfds:no_such_dataset:train@{tfds_dir}")
    with pytest.raises(ValueError, match="missing field 'body'"):
        make_source(f"tfds:tiny_docs:train@{tfds_dir}#body")[0]


# --- arrayrecord --------------------------------------------------------------------------


def write_array_record(path, records: list[bytes]):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    return path


def test_arrayrecord_text_and_json(tmp_path):
    write_array_record(tmp_path / "a.array_record", ["plain one".encode(), "plain 二".encode()])
    write_array_record(tmp_path / "b.array_record", [b"plain three"])
    assert docs(make_source(f"arrayrecord:{tmp_path}/*.array_record")) == ["plain one", "plain 二", "plain three"]
    write_array_record(tmp_path / "j.ar", [json.dumps({"body": "from json"}).encode()])
    assert docs(make_source(f"arrayrecord:{tmp_path}/j.ar#body")) == ["from json"]


def test_arrayrecord_bad_record_error_and_skip(tmp_path):
    path = write_array_record(tmp_path / "a.ar", [b"good", b"\xff\xfe bad", b"", b"also good"])
    lazy = make_source(f"arrayrecord:{path}")
    assert len(lazy) == 4 and lazy[0] == "good"
    with pytest.raises(ValueError, match=r"a\.ar: record 1: line 1: invalid UTF-8"):
        lazy[1]
    skipping = make_source(f"arrayrecord:{path}", on_bad_record="skip")
    assert docs(skipping) == ["good", "also good"]
    assert skipping.report["skipped"] == {"non_utf8": 1, "empty": 1}


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["text:{d}/nothing*.txt", "jsonl:{d}/missing.jsonl", "arrayrecord:{d}/none.ar"])
def test_missing_file(tmp_path, spec):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        make_source(spec.format(d=tmp_path))


def test_empty_corpus(tmp_path):
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "blank.txt", "  \n\n")
    with pytest.raises(ValueError, match="empty corpus"):
        make_source(f"text:{tmp_path}/*.txt")
    write(tmp_path / "e.jsonl", "\n\n")
    with pytest.raises(ValueError, match="empty corpus"):
        make_source(f"jsonl:{tmp_path}/e.jsonl")


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"text": broken\n[1, 2]\n{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        make_source(f"jsonl:{path}")
    src = make_source(f"jsonl:{path}", on_bad_record="skip")
    assert docs(src) == ["ok", "fine"] and src.report["skipped"] == {"invalid_json": 2}


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"body": "no text"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing field 'text' \(keys: \['body'\]\)"):
        make_source(f"jsonl:{path}")
    src = make_source(f"jsonl:{path}", on_bad_record="skip")
    assert docs(src) == ["ok"] and src.report["skipped"] == {"missing_field": 2}


def test_non_utf8(tmp_path):
    path = write(tmp_path / "t.txt", b"line one\nline two \xff\xfe\n")
    with pytest.raises(ValueError, match=r"t\.txt: line 2: invalid UTF-8 byte at offset 18"):
        make_source(f"text:{path}")
    j = write(tmp_path / "j.jsonl", b'{"text": "a"}\n{"text": "\xc3("}\n')
    with pytest.raises(ValueError, match=r"j\.jsonl:2: line 1: invalid UTF-8"):
        make_source(f"jsonl:{j}")
    write(tmp_path / "u.txt", "fine")
    src = make_source(f"text:{tmp_path}/*.txt", on_bad_record="skip")
    assert docs(src) == ["fine"] and src.report["skipped"] == {"non_utf8": 1}


@pytest.mark.parametrize("spec", ["ftp:x", "data/file.txt", "text:", "builtin:nope"])
def test_unknown_scheme_or_name(spec):
    with pytest.raises(ValueError, match="unknown"):
        make_source(spec)


def test_bad_options():
    with pytest.raises(ValueError, match="on_bad_record must be"):
        make_source("builtin:tinyshakespeare", on_bad_record="ignore")
    with pytest.raises(ValueError, match="text_split must be"):
        make_source("builtin:tinyshakespeare", text_split="line")


def test_infer_spec_and_asset_path():
    assert sources.infer_spec("a/b.jsonl.gz#body") == "jsonl:a/b.jsonl.gz#body"
    assert sources.infer_spec("a/*.txt") == "text:a/*.txt"
    assert sources.infer_spec("tfds:x:train") == "tfds:x:train"
    with pytest.raises(FileNotFoundError, match="no vendored asset"):
        sources.asset_path("nope.txt")
