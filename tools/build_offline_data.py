"""How the offline texts and tasks under data/ were made (run once by a maintainer; the outputs are committed).

The repo carries its offline texts and tasks because registries drop files: until 2026-12-07 they were read
from the bigbench==1.0.0 sdist on PyPI, which is no longer served. Sources, licences and attribution:
data/README.md.

  new_wiki   -- SQuADShifts "new_wiki" (Miller et al. 2020), the same JSON the bigbench sdist carried:
                48 Wikipedia articles; their paragraphs joined exactly as before, so perplexities on
                new_wiki are unchanged.
  squad_wiki -- since 2026-12-07: the lead articles of the shortened English Wikipedia dump in gensim's
                test data (gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-
                shortened.bz2, in every gensim wheel on PyPI), markup stripped with mwparserfromhell. The
                SQuAD v1.1 dev articles it held before are no longer to be had from a registry.
  mc/piqa    -- PIQA (Bisk et al. 2020) validation split, 1,838 two-choice items, in BIG-bench's JSON layout
                ({"examples": [{"input", "target_scores"}]}) so the offline task reads every carried task alike.

    python tools/build_offline_data.py --new_wiki_json new_wiki_v1.0.json --enwiki_dump enwiki-...bz2 \
        --piqa_dir piqa/data
Needs mwparserfromhell (not a requirement of the tool: only this script uses it).
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offline_resources import CHECKSUMS, DATA_DIR, MC_DIR, TEXTS_DIR, squad_text  # noqa: E402

N_ARTICLES = 48           # as many articles as each text held before
MIN_ARTICLE_CHARS = 4000  # of plain text: stubs, lists and disambiguation pages say little
DROP_SECTIONS = ("see also", "references", "notes", "further reading", "external links", "bibliography",
                 "sources", "citations", "footnotes", "works cited", "notes and references")


def _strip_markup(wikitext: str) -> str:
    """Plain prose of one article: templates, references, tables, files and categories removed, section
    titles kept as ' = Title = ' lines (the style of the SQuAD-derived texts), reference sections dropped."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for node in list(code.filter_templates(recursive=False)) + list(code.filter_tags(recursive=False)):
        tag = str(getattr(node, "tag", "")).lower()
        if isinstance(node, mwparserfromhell.nodes.Template) or tag in ("ref", "table", "gallery", "math",
                                                                        "references", "div", "timeline"):
            try:
                code.remove(node)
            except ValueError:
                pass
    for link in code.filter_wikilinks():
        target = str(link.title).strip().lower()
        if target.startswith(("file:", "image:", "category:")) or re.match(r"^[a-z-]{2,12}:", target):
            try:
                code.remove(link)
            except ValueError:
                pass
    out, skip = [], False
    for section in code.get_sections(include_lead=True, flat=True):
        headings = section.filter_headings()
        if headings:
            title = headings[0].title.strip_code().strip()
            skip = title.lower() in DROP_SECTIONS
            if skip:
                continue
            body = section.strip_code(normalize=True, collapse=True)
            body = body.split("\n", 1)[1] if "\n" in body else ""
            paras = _paragraphs(body)
            if paras:
                out.append(f" = {title} = ")
                out.extend(paras)
        elif not skip:
            out.extend(_paragraphs(section.strip_code(normalize=True, collapse=True)))
    return "\n\n".join(out)


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs: lines of at least 80 characters with a sentence end (bullets and table debris out)."""
    paras = []
    for line in text.split("\n"):
        line = re.sub(r"<ref[^>]*?/>|<ref[^>]*>.*?</ref>|<[^>]+>", "", line)  # nested references left over
        line = re.sub(r"\s+", " ", line).strip()
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line).replace(" ,", ",").replace(" .", ".")
        if len(line) >= 80 and re.search(r"[.!?]\"?$", line) and not line.startswith(("*", "|", "!", "{")):
            paras.append(line)
    return paras


def wiki_articles(dump: Path, n: int, exclude_titles: set[str]) -> list[tuple[str, str]]:
    """The first n articles (namespace 0, no redirect, lists and disambiguation pages) of a MediaWiki dump."""
    articles = []
    with bz2.open(dump, "rb") as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = {c.tag.split("}")[1]: c for c in elem}
            title = ns["title"].text or ""
            rev = ns.get("revision")
            text_el = next((c for c in rev if c.tag.endswith("}text")), None) if rev is not None else None
            wikitext = (text_el.text or "") if text_el is not None else ""
            elem.clear()
            if ns["ns"].text != "0" or "redirect" in ns or wikitext.lstrip()[:9].upper() == "#REDIRECT" \
                    or title.startswith("List of") or "disambiguation" in title.lower() \
                    or title.lower() in exclude_titles:
                continue
            body = _strip_markup(wikitext)
            if len(body) >= MIN_ARTICLE_CHARS:
                articles.append((title, body))
                if len(articles) == n:
                    break
    return articles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new_wiki_json", required=True, type=Path, help="SQuADShifts new_wiki_v1.0.json")
    p.add_argument("--enwiki_dump", required=True, type=Path, help="gensim's shortened enwiki .xml.bz2")
    p.add_argument("--piqa_dir", required=True, type=Path, help="folder with PIQA's valid.jsonl and valid-labels.lst")
    args = p.parse_args()
    TEXTS_DIR.mkdir(parents=True, exist_ok=True)
    MC_DIR.mkdir(parents=True, exist_ok=True)
    new_wiki = squad_text(args.new_wiki_json)
    new_titles = {a.get("title", "").replace("_", " ").strip().lower()
                  for a in json.loads(args.new_wiki_json.read_text(encoding="utf-8"))["data"]}
    calib = wiki_articles(args.enwiki_dump, N_ARTICLES, new_titles)
    squad_wiki = "\n\n".join(f" = {t} = \n\n{body}" for t, body in calib)
    for name, text in (("new_wiki", new_wiki), ("squad_wiki", squad_wiki)):
        path = TEXTS_DIR / f"{name}.txt"
        path.write_text(text, encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(text):,} chars, sha256 {hashlib.sha256(text.encode()).hexdigest()}")
    print("squad_wiki articles:", ", ".join(t for t, _ in calib))
    piqa = piqa_task(args.piqa_dir)
    (MC_DIR / "piqa.json").write_text(json.dumps(piqa, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"data/mc/piqa.json: {len(piqa['examples'])} items")
    files = sorted(p for p in DATA_DIR.rglob("*") if p.is_file() and p.suffix in (".txt", ".json"))
    CHECKSUMS.write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(DATA_DIR)}\n"
                                 for p in files), encoding="utf-8")


def piqa_task(folder: Path) -> dict:
    """PIQA's validation split (goal, sol1, sol2; labels in a parallel file) as a BIG-bench JSON task."""
    items = [json.loads(ln) for ln in (folder / "valid.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    labels = [int(ln) for ln in (folder / "valid-labels.lst").read_text().split()]
    if len(items) != len(labels):
        raise SystemExit(f"PIQA: {len(items)} items but {len(labels)} labels")
    examples = []
    for item, label in zip(items, labels):
        sols = [item["sol1"].strip(), item["sol2"].strip()]
        if sols[0] == sols[1]:
            continue  # identical choices cannot be told apart: no item
        examples.append({"input": item["goal"].strip(), "target_scores": {s: int(i == label) for i, s in enumerate(sols)}})
    return {"name": "piqa", "description": "PIQA validation split (physical commonsense), two choices",
            "source": "https://yonatanbisk.com/piqa/ (Bisk et al., AAAI 2020)", "license": "AFL-3.0",
            "examples": examples}


if __name__ == "__main__":
    main()
