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
  mc/*.jsonl -- the offline zero-shot suite cur4llm_zeroshot and its extra tasks (one doc a line, in the
                fields the task's YAML in tools/lm_tasks reads):
                hellaswag    <- klosax/hellaswag_text_data@1105d370 hellaswag_val_full.txt.bz2 (a text dump of
                                rowanz/hellaswag data/hellaswag_val.jsonl): the first N_HELLASWAG items
                arc_easy, arc_challenge, boolq, copa, wsc273, winogrande
                             <- mosaicml/llm-foundry@8c8dd48f scripts/eval/local_data/* (foundry_tasks)
                lambada_mc   <- the same folder's lambada_openai.jsonl, as 4-way multiple choice (lambada_mc_docs)
                squadshifts  <- new_wiki_v1.0.json, as 4-way reading comprehension (squadshifts_rc_docs)

    python tools/build_offline_data.py --new_wiki_json new_wiki_v1.0.json --enwiki_dump enwiki-...bz2 \
        --piqa_dir piqa/data --foundry_dir llm-foundry/scripts/eval/local_data \
        --hellaswag_txt hellaswag_val_full.txt.bz2
Each source is optional (what is not given is not rebuilt); SHA256SUMS is rewritten for every carried file.
The texts need mwparserfromhell (not a requirement of the tool: only this script uses it); lambada_mc reads
SmolLM2's tokenizer (offline_resources.offline_model_dir).
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

from offline_resources import (CARRIED_SUFFIXES, CHECKSUMS, DATA_DIR, MC_DIR, TEXTS_DIR,  # noqa: E402
                               offline_model_dir, squad_text)

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
    p.add_argument("--new_wiki_json", type=Path, help="SQuADShifts new_wiki_v1.0.json (new_wiki; the squadshifts task)")
    p.add_argument("--enwiki_dump", type=Path, help="gensim's shortened enwiki .xml.bz2")
    p.add_argument("--piqa_dir", type=Path, help="folder with PIQA's valid.jsonl and valid-labels.lst")
    p.add_argument("--foundry_dir", type=Path,
                   help="llm-foundry's scripts/eval/local_data folder (arc, boolq, copa, wsc273, winogrande, lambada)")
    p.add_argument("--hellaswag_txt", type=Path, help="hellaswag_val_full.txt(.bz2) of klosax/hellaswag_text_data")
    args = p.parse_args()
    texts = (args.new_wiki_json, args.enwiki_dump)
    if args.enwiki_dump and not args.new_wiki_json:
        p.error("--enwiki_dump needs --new_wiki_json (the calibration text excludes new_wiki's titles)")
    if not any(texts + (args.piqa_dir, args.foundry_dir, args.hellaswag_txt)):
        p.error("nothing to build: give the sources of what to rebuild")
    TEXTS_DIR.mkdir(parents=True, exist_ok=True)
    MC_DIR.mkdir(parents=True, exist_ok=True)
    if all(texts):
        build_texts(args.new_wiki_json, args.enwiki_dump)
    if args.piqa_dir:
        piqa = piqa_task(args.piqa_dir)
        (MC_DIR / "piqa.json").write_text(json.dumps(piqa, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"data/mc/piqa.json: {len(piqa['examples'])} items")
    suite = {}
    if args.new_wiki_json:
        suite["squadshifts"] = squadshifts_rc_docs(args.new_wiki_json)
    if args.foundry_dir:
        suite.update(foundry_tasks(args.foundry_dir))
        tokenizer_dir = offline_model_dir("smollm2-135m")
        suite["lambada_mc"] = lambada_mc_docs(args.foundry_dir / "language_understanding/lambada_openai.jsonl",
                                              tokenizer_dir)[:N_LAMBADA]
    if args.hellaswag_txt:
        suite["hellaswag"] = hellaswag_docs(args.hellaswag_txt)[:N_HELLASWAG]
    for name, docs in suite.items():
        path = MC_DIR / f"{name}.jsonl"
        write_jsonl(path, docs)
        print(f"{path.relative_to(ROOT)}: {len(docs)} items, {path.stat().st_size:,} bytes")
    files = sorted(p for p in DATA_DIR.rglob("*") if p.is_file() and p.suffix in CARRIED_SUFFIXES)
    CHECKSUMS.write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(DATA_DIR)}\n"
                                 for p in files), encoding="utf-8")


def build_texts(new_wiki_json: Path, enwiki_dump: Path) -> None:
    """texts/new_wiki.txt and texts/squad_wiki.txt."""
    new_wiki = squad_text(new_wiki_json)
    new_titles = {a.get("title", "").replace("_", " ").strip().lower()
                  for a in json.loads(new_wiki_json.read_text(encoding="utf-8"))["data"]}
    calib = wiki_articles(enwiki_dump, N_ARTICLES, new_titles)
    squad_wiki = "\n\n".join(f" = {t} = \n\n{body}" for t, body in calib)
    for name, text in (("new_wiki", new_wiki), ("squad_wiki", squad_wiki)):
        path = TEXTS_DIR / f"{name}.txt"
        path.write_text(text, encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(text):,} chars, sha256 {hashlib.sha256(text.encode()).hexdigest()}")
    print("squad_wiki articles:", ", ".join(t for t, _ in calib))


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


# ---------------------------------------------------------------- the offline zero-shot suite (data/mc/*.jsonl)
# One JSON document a line, in the fields the task's lm-eval YAML reads (tools/lm_tasks/cur4llm_*.yaml): the
# fields of the dataset lm-eval's own task reads where they could be recovered, else lm-eval's processed doc.
N_HELLASWAG = 1000  # of 10,042 validation items: the first ones, so --limit N scores what hellaswag --limit N does
N_BOOLQ = 1000      # of 3,270 validation items, likewise (passages of ~130 words: 2.2 MB for all of them)
N_LAMBADA = 1000    # of the 2,128 LAMBADA items kept as multiple choice (lambada_mc_docs), the first ones


def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _dedup_choices(choices: list[str], gold: int) -> tuple[list[str], int]:
    """Choices without repeats (llm-foundry pads ARC's three-choice items to four by repeating one), the
    gold index moved with them."""
    out = []
    for c in choices:
        if c not in out:
            out.append(c)
    return out, out.index(choices[gold])


def foundry_tasks(folder: Path) -> dict[str, list[dict]]:
    """ARC-Easy and ARC-Challenge (test), BoolQ (validation, first N_BOOLQ), COPA (SuperGLUE validation),
    WSC273 and WinoGrande (dev) from the copies in llm-foundry's scripts/eval/local_data (Apache 2.0 repo;
    each dataset under its own licence, data/README.md)."""
    out = {}
    for name, rel in (("arc_easy", "world_knowledge/arc_easy.jsonl"),
                      ("arc_challenge", "world_knowledge/arc_challenge.jsonl")):
        docs = []
        for r in _read_jsonl(folder / rel):
            if not r["query"].startswith("Question: "):
                raise SystemExit(f"{rel}: unexpected query {r['query'][:60]!r}")
            choices, gold = _dedup_choices(r["choices"], r["gold"])
            docs.append({"question": r["query"][len("Question: "):].strip(), "choices": choices, "label": gold})
        out[name] = docs
    docs = []
    for r in _read_jsonl(folder / "reading_comprehension/boolq.jsonl")[:N_BOOLQ]:
        passage, question = r["query"].split("\nQuestion: ")
        if r["choices"] != ["no", "yes"] or not passage.startswith("Passage: "):
            raise SystemExit(f"boolq: unexpected item {r['query'][:60]!r}")
        docs.append({"passage": passage[len("Passage: "):].strip(), "question": question.strip().rstrip("?"),
                     "label": r["gold"]})
    out["boolq"] = docs
    docs = []
    for r in _read_jsonl(folder / "commonsense_reasoning/copa.jsonl"):
        head, connector = r["query"].rsplit(" ", 1)  # "<premise without its full stop>, because|therefore"
        question = {"because": "cause", "therefore": "effect"}[connector]
        head = head[:-1] if head.endswith(",") else head
        c1, c2 = (c[:1].upper() + c[1:] for c in r["choices"])  # foundry lower-cased the first letter
        docs.append({"premise": head + ".", "question": question, "choice1": c1, "choice2": c2, "label": r["gold"]})
    out["copa"] = docs
    for name, rel in (("wsc273", "language_understanding/winograd_wsc.jsonl"),
                      ("winogrande", "language_understanding/winogrande.jsonl")):
        out[name] = [{"context_options": r["context_options"], "continuation": r["continuation"], "label": r["gold"]}
                     for r in _read_jsonl(folder / rel)]
    return out


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag text clean-up: WikiHow's bracket tags out, no double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _capitalize_last_fragment(ctx: str) -> str:
    """lm-eval's hellaswag writes ctx_a + ' ' + ctx_b.capitalize(); the text file holds ctx = ctx_a + ' ' +
    ctx_b. ctx_b, where there is one, is the unfinished last sentence: its first letter is made a capital."""
    m = re.search(r"^(.*[.!?]\s+)([a-z])([^.!?]*)$", ctx)
    return f"{m.group(1)}{m.group(2).upper()}{m.group(3)}" if m else ctx


def hellaswag_docs(path: Path) -> list[dict]:
    """HellaSwag's validation split from klosax/hellaswag_text_data (six lines an item: activity label + ': '
    + context, gold index, four endings; made from rowanz/hellaswag's hellaswag_val.jsonl)."""
    raw = bz2.open(path, "rb").read() if path.suffix == ".bz2" else path.read_bytes()
    lines = raw.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise SystemExit(f"{path}: {len(lines)} lines, not six per item")
    docs = []
    for i in range(0, len(lines), 6):
        label, ctx = lines[i].split(": ", 1)
        query = _hellaswag_clean(f"{label}: {_capitalize_last_fragment(ctx.strip())}")
        docs.append({"query": query, "choices": [_hellaswag_clean(e) for e in lines[i + 2:i + 6]],
                     "label": int(lines[i + 1])})
    return docs


# ---------------------------------------------------------------- SQuADShifts as multiple choice (reading comprehension)
RC_MAX_ANSWER_WORDS = 5   # short answers only: entities, numbers, dates (long spans would be told apart by length)
RC_CHOICES = 4


def _norm_answer(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _answers_overlap(a: str, b: str) -> bool:
    """Two normalised answers that may say the same thing: one inside the other, or half their words shared."""
    wa, wb = set(a.split()), set(b.split())
    return a in b or b in a or len(wa & wb) >= 0.5 * min(len(wa), len(wb))


def _sentence_at(context: str, start: int) -> str:
    """The sentence of `context` that holds character `start` (sentences end at . ! ? before a capital)."""
    bounds = [0] + [m.end() for m in re.finditer(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(])", context)] + [len(context)]
    for a, b in zip(bounds, bounds[1:]):
        if a <= start < b:
            return context[a:b].strip()
    return context.strip()


def squadshifts_rc_docs(path: Path, window: str = "sentence") -> list[dict]:
    """Reading comprehension as multiple choice from a SQuADShifts file (SQuAD v1.1 layout): for each paragraph,
    its first question whose first answer is short and has three short answers of other questions of the same
    paragraph that neither contain it nor each other. Context: the sentence that holds the answer (window
    "sentence") or the whole paragraph ("paragraph"); choices: the answer and those three, in a seeded order."""
    import random
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    docs = []
    for art in data:
        for para in art["paragraphs"]:
            ctx, qas = para["context"], para["qas"]
            answers = [qa["answers"][0]["text"].strip().rstrip(".,;:").strip() for qa in qas]
            for i, qa in enumerate(qas):
                gold = answers[i]
                if not _norm_answer(gold) or len(gold.split()) > RC_MAX_ANSWER_WORDS:
                    continue
                picked = [gold]
                for j, a in enumerate(answers):
                    na = _norm_answer(a)
                    if j == i or not na or len(a.split()) > RC_MAX_ANSWER_WORDS:
                        continue
                    if any(_answers_overlap(na, _norm_answer(x)) for x in picked):
                        continue
                    picked.append(a)
                    if len(picked) == RC_CHOICES:
                        break
                if len(picked) < RC_CHOICES:
                    continue
                context = (_sentence_at(ctx, qa["answers"][0]["answer_start"]) if window == "sentence"
                           else ctx.strip())
                choices = picked[:]
                random.Random(f"squadshifts:{qa['id']}").shuffle(choices)
                docs.append({"context": context, "question": qa["question"].strip(), "choices": choices,
                             "label": choices.index(gold), "id": qa["id"]})
                break
    return docs


# ---------------------------------------------------------------- LAMBADA as multiple choice (a proxy of lm-eval's lambada)
LAMBADA_STOP = set("""a an the and or but if then than that this these those there their them they he she it its his her
him you your we our us i me my of in on at to for from by with as is are was were be been being have has had do does did
not no so too very can could will would shall should may might must just also only about into over under out up down off
what which who whom whose when where why how all any some each every both either neither one two""".split())


def _single_token_words(tokenizer_dir: Path | None):
    """A test `word -> True if ' word' is one token` for SmolLM2's tokenizer, or None (no restriction)."""
    if tokenizer_dir is None:
        return None
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda w: len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1


def lambada_mc_docs(path: Path, tokenizer_dir: Path | None = None) -> list[dict]:
    """LAMBADA (OpenAI's detokenised test set, lm-eval's lambada_openai) as four-way multiple choice: the passage,
    then its true last word or one of three other words of the same passage: the last three distinct words
    before the blank that are no stop word, have three letters or more and the target's capitalisation (a
    name competes with names). Only items whose four words are one token each (with a leading space) for the
    given tokenizer (SmolLM2's): lm-eval then scores an item in one forward pass."""
    import random
    one_token = _single_token_words(tokenizer_dir)
    docs = []
    for i, r in enumerate(_read_jsonl(path)):
        context, target = r["context"], r["continuation"].strip()
        if not re.fullmatch(r"[A-Za-z]+", target):
            continue
        upper = target[0].isupper()
        picked = []
        for w in reversed(re.findall(r"[A-Za-z]+", context)):
            if (len(w) < 3 or w.lower() in LAMBADA_STOP or w.lower() == target.lower() or w[0].isupper() != upper
                    or any(w.lower() == p.lower() for p in picked)):
                continue
            picked.append(w)
            if len(picked) == 3:
                break
        choices = [target] + picked
        if len(picked) < 3 or (one_token and not all(one_token(c) for c in choices)):
            continue
        random.Random(f"lambada:{i}").shuffle(choices)
        docs.append({"context": context, "choices": choices, "label": choices.index(target), "idx": i})
    return docs


if __name__ == "__main__":
    main()
