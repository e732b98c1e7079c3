"""Text → documents → blocks: formats, splits, packing, the on-disk cache, and bad input."""
import json

import pytest
import torch

from pocketlm.data.text import DataError, build_blocks, hash_documents, pack, read_documents, split_documents


def test_txt_blank_line_documents(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc\nline two\n\n\n second doc \n\n", encoding="utf-8")
    assert read_documents(p) == ["first doc\nline two", " second doc "]


def test_folder_of_txt_is_one_document_per_file(tmp_path):
    (tmp_path / "b.txt").write_text("beta\n\nstill beta")
    (tmp_path / "a.txt").write_text("alpha")
    assert read_documents(tmp_path) == ["alpha", "beta\n\nstill beta"]


def test_jsonl_named_field_and_missing_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"body": f"doc {i}", "id": i}) for i in range(3)))
    assert read_documents(p, field="body") == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(DataError, match="no field 'text'.*body"):
        read_documents(p)


def test_parquet_through_datasets(tmp_path):
    import datasets

    p = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": ["one", "", "two"]}).to_parquet(str(p))
    assert read_documents(p) == ["one", "two"]


def test_local_hf_dataset_folder(tmp_path):
    import datasets

    d = tmp_path / "ds"
    (d / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": ["x y", "z"]}).to_json(str(d / "data" / "train.jsonl"))
    assert read_documents(str(d)) == ["x y", "z"]


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00bad bytes", "not UTF-8"),
    (b"\n\n   \n", "no non-empty documents"),
])
def test_bad_text_files(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_documents(p)


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(DataError, match="data not found"):
        read_documents(tmp_path / "nope.txt")
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match="unsupported file type"):
        read_documents(tmp_path / "x.bin")
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "ok"}\n{not json')
    with pytest.raises(DataError, match="broken.jsonl"):
        read_documents(bad)


def test_split_is_by_document_seeded_and_disjoint():
    docs = [f"d{i}" for i in range(20)]
    tr, va = split_documents(docs, 0.2, seed=3)
    assert len(va) == 4 and set(tr) | set(va) == set(docs) and not set(tr) & set(va)
    assert split_documents(docs, 0.2, seed=3) == (tr, va)
    assert split_documents(docs, 0.2, seed=4) != (tr, va)
    with pytest.raises(DataError, match="too few"):
        split_documents(["only"], 0.5, 0)


def test_pack_joins_with_eos_and_cuts_blocks(tokenizer):
    docs = ["The cat sat on the mat.", "The dog sat on the log."]
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    stream = ids[0] + [tokenizer.eos_token_id] + ids[1] + [tokenizer.eos_token_id]
    blocks = pack(docs, tokenizer, 4)
    assert blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    with pytest.raises(DataError, match="fewer than one block"):
        pack(docs, tokenizer, 10_000)


def test_blocks_are_cached_by_content(tmp_path, tokenizer, corpus_file, monkeypatch):
    from pocketlm.data import text

    docs = read_documents(corpus_file)
    a = build_blocks(docs, tokenizer, block_size=16, cache_dir=tmp_path)
    files = list(tmp_path.glob("blocks-*.safetensors"))
    assert len(files) == 1
    real_pack = text.pack
    monkeypatch.setattr(text, "pack", lambda *a, **k: pytest.fail("the cached blocks were not used"))
    b = build_blocks(docs, tokenizer, block_size=16, cache_dir=tmp_path)
    monkeypatch.setattr(text, "pack", real_pack)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and a.data_hash == b.data_hash
    assert a.val_docs == b.val_docs == split_documents(docs, 0.1, 0)[1]  # the documents behind the val blocks
    c = build_blocks(docs[:-1], tokenizer, block_size=16, cache_dir=tmp_path)
    assert c.data_hash != a.data_hash and len(list(tmp_path.glob("blocks-*.safetensors"))) == 2
    assert hash_documents(docs) != hash_documents(docs[:-1])


def test_wikitext_headings_split_and_non_utf8_line(tmp_path):
    p = tmp_path / "wiki.raw"
    p.write_bytes(b" = A = \r\n text a \r\n = = Sub = = \r\n more a \r\n = B = \r\n text b \r\n")
    assert read_documents(p, txt_split="wikitext_headings") == [
        " = A = \n text a \n = = Sub = = \n more a \n", " = B = \n text b \n"]
    with pytest.raises(DataError, match="unknown txt_split 'x'"):
        read_documents(p, txt_split="x")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nstill fine\nbad \xff here\n")
    with pytest.raises(DataError, match="line 3"):
        read_documents(bad)


def test_real_wikitext_test_split_has_62_articles():
    from conftest import SHARED_DATA

    path = SHARED_DATA / "wikitext2" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} absent (shared benchmark data not on this machine)")
    docs = read_documents(path, txt_split="wikitext_headings")
    assert len(docs) == 62  # EleutherAI/wikitext_document_level's test split has 62 pages
    assert docs[0].startswith(" = Robert Boulter = \n") and docs[1].startswith(" = Du Fu = \n")
