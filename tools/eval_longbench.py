"""LongBench evaluation of a dense, compressed-in-memory or exported model.

    # dense model (or an exported ACUR repo dir: its remote code is trusted automatically)
    python tools/eval_longbench.py --model_id meta-llama/Llama-2-7b-hf --longbench_datasets qasper,hotpotqa
    # compress in memory first: any acur.py flag works; a compression target switches it on
    python tools/eval_longbench.py --model_id meta-llama/Llama-2-7b-hf --act_aware --param_ratio_target 0.9 \\
        --calib_dataset wikitext2 --use_cache --longbench_datasets qasper
    # offline: a local file in LongBench's schema
    python tools/eval_longbench.py --model_id smollm2-135m --data_file my_longbench.jsonl --max_length 2048

Data: LongBench's jsonl rows {"input", "context", "answers", "length", "dataset", "all_classes", "_id"};
from the hub (THUDM/LongBench data.zip, needs network) or --data_file (jsonl or a JSON list; rows grouped by
"dataset"). Protocol as LongBench: prompt per dataset, prompts longer than --max_length tokens cut in the
middle (first and last halves kept), greedy decoding with a per-dataset token budget, score = max over the
reference answers, mean x 100 per dataset. The prompt wording here is our own; pass --prompt_config with
LongBench's config/ directory (dataset2prompt.json, dataset2maxlen.json) for its exact prompts. Metric
differences, recorded in the output's notes: Chinese datasets tokenised per character (LongBench: jieba);
code similarity by difflib's ratio (LongBench: fuzzywuzzy's Levenshtein ratio).
"""
from __future__ import annotations

import difflib
import json
import re
import string
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEMA = "cur4llm.longbench/1"
HUB_REPO = "THUDM/LongBench"
ENGLISH = ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
           "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc",
           "repobench-p"]
CHINESE = ["multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"]
FEW_SHOT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}  # no chat wrapping; first line scored
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}
MAX_NEW_TOKENS = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
                  "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512,
                  "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
                  "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
                  "lcc": 64, "repobench-p": 64}

_QA = "Read the text below and answer the question with a short phrase only.\n\n{context}\n\nQuestion: {input}\nAnswer:"
_MULTI_DOC = ("Here are several passages.\n\n{context}\n\nUsing the passages, answer the question with a short "
              "phrase only.\n\nQuestion: {input}\nAnswer:")
_SUMMARY = "Below is a document.\n\n{context}\n\nWrite a summary of the document.\n\nSummary:"
_ZH_QA = "阅读以下文字并简短回答问题。\n\n{context}\n\n问题：{input}\n回答："
PROMPTS = {
    "narrativeqa": "Below is a story.\n\n{context}\n\nAnswer the question about the story in one short phrase."
                   "\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "Below is a scientific article.\n\n{context}\n\nAnswer the question in a short phrase or sentence; "
              "write \"unanswerable\" if the article does not say, and \"yes\" or \"no\" for yes/no questions."
              "\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": _QA, "hotpotqa": _MULTI_DOC, "2wikimqa": _MULTI_DOC, "musique": _MULTI_DOC,
    "gov_report": _SUMMARY, "multi_news": _SUMMARY,
    "qmsum": "Below is a meeting transcript.\n\n{context}\n\nAnswer the query about the meeting in a few "
             "sentences.\n\nQuery: {input}\nAnswer:",
    "trec": "Classify the type of each question, following the examples.\n\n{context}\n{input}",
    "triviaqa": "Answer each question with a short phrase, following the examples.\n\n{context}\n\n{input}",
    "samsum": "Summarise each dialogue in a few sentences, following the examples.\n\n{context}\n\n{input}",
    "passage_count": "Below are paragraphs, some of them repeated.\n\n{context}\n\nHow many distinct paragraphs "
                     "are there? Reply with the number only.\n\nThe number of distinct paragraphs is: ",
    "passage_retrieval_en": "Below are numbered paragraphs and then a summary of one of them.\n\n{context}\n\n"
                            "Summary:\n\n{input}\n\nWhich paragraph is summarised? Reply like \"Paragraph 3\"."
                            "\n\nThe answer is: ",
    "lcc": "Complete the code below.\n{context}Next line of code:\n",
    "repobench-p": "Complete the code below.\n{context}{input}Next line of code:\n",
    "multifieldqa_zh": _ZH_QA, "dureader": _ZH_QA,
    "vcsum": "下面是一段会议记录。\n\n{context}\n\n请总结会议的内容。\n\n会议总结：",
    "lsht": "请参照例子判断新闻的类别。\n\n{context}\n{input}",
    "passage_retrieval_zh": "下面是若干段落和其中一段的摘要。\n\n{context}\n\n摘要：\n\n{input}\n\n"
                            "摘要出自哪一段？请回答如\"段落1\"。\n\n答案是：",
}


# ---------------------------------------------------------------- metrics
def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no English articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh(text: str) -> str:
    zh_punct = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
    drop = set(string.punctuation + zh_punct)
    return "".join(ch for ch in text.lower() if ch not in drop and not ch.isspace())


def token_f1(pred: list[str], ref: list[str]) -> float:
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def qa_f1(pred: str, ref: str, **_) -> float:
    return token_f1(normalize_answer(pred).split(), normalize_answer(ref).split())


def qa_f1_zh(pred: str, ref: str, **_) -> float:
    return token_f1(list(normalize_zh(pred)), list(normalize_zh(ref)))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str, **_) -> float:
    """ROUGE-L F1 on lower-cased word tokens."""
    p, r = re.findall(r"\w+", pred.lower()), re.findall(r"\w+", ref.lower())
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    return 0.0 if lcs == 0 else 2 * (lcs / len(p)) * (lcs / len(r)) / (lcs / len(p) + lcs / len(r))


def rouge_l_zh(pred: str, ref: str, **_) -> float:
    return rouge_l(" ".join(normalize_zh(pred)), " ".join(normalize_zh(ref)))


def classification(pred: str, ref: str, all_classes=None, **_) -> float:
    """1/k if the gold class is among the k classes named in the prediction (classes that are only part of
    the gold name do not count)."""
    named = [c for c in (all_classes or []) if c in pred]
    named = [c for c in named if not (c in ref and c != ref)]
    return 1.0 / len(named) if ref in named else 0.0


def _number_match(pred: str, target: str) -> float:
    numbers = re.findall(r"\d+", pred)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(pred: str, ref: str, **_) -> float:
    m = re.findall(r"Paragraph (\d+)", ref)
    return _number_match(pred, m[0]) if m else 0.0


def retrieval_zh(pred: str, ref: str, **_) -> float:
    m = re.findall(r"段落(\d+)", ref)
    return _number_match(pred, m[0]) if m else 0.0


def count(pred: str, ref: str, **_) -> float:
    return _number_match(pred, str(ref).strip())


def code_sim(pred: str, ref: str, **_) -> float:
    """Similarity of the first code line of the prediction (comments/fences skipped) to the reference."""
    line = next((ln for ln in pred.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return difflib.SequenceMatcher(None, line, ref).ratio()


METRICS = {"narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "multifieldqa_zh": qa_f1_zh,
           "hotpotqa": qa_f1, "2wikimqa": qa_f1, "musique": qa_f1, "dureader": rouge_l_zh,
           "gov_report": rouge_l, "qmsum": rouge_l, "multi_news": rouge_l, "vcsum": rouge_l_zh,
           "trec": classification, "triviaqa": qa_f1, "samsum": rouge_l, "lsht": classification,
           "passage_retrieval_en": retrieval, "passage_count": count, "passage_retrieval_zh": retrieval_zh,
           "lcc": code_sim, "repobench-p": code_sim}
NOTES = {"zh": "Chinese datasets scored per character, not with jieba words as LongBench",
         "code": "code similarity by difflib ratio, not fuzzywuzzy's Levenshtein ratio as LongBench"}


def score_one(dataset: str, pred: str, answers: list[str], all_classes=None) -> float:
    """Best score of a prediction over the reference answers, in [0, 1]."""
    if dataset in FIRST_LINE:
        pred = pred.lstrip("\n").split("\n")[0]
    fn = METRICS[dataset]
    return max((fn(pred, a, all_classes=all_classes) for a in answers), default=0.0)


def length_bucket(length: int) -> str:
    return "0-4k" if length < 4000 else ("4-8k" if length < 8000 else "8k+")


# ---------------------------------------------------------------- data
def read_rows(path: Path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    for i, r in enumerate(rows):
        missing = {"input", "context", "answers"} - set(r)
        if missing:
            raise ValueError(f"{path}: row {i} lacks {', '.join(sorted(missing))} (LongBench schema)")
        if not isinstance(r["answers"], list):
            raise ValueError(f"{path}: row {i}: 'answers' must be a list")
    return rows


def load_hub(datasets: list[str], longbench_e: bool) -> dict[str, list[dict]]:
    """Rows per dataset from the hub's data.zip (LongBench's own loader script no longer runs on datasets>=4)."""
    from huggingface_hub import hf_hub_download
    try:
        zpath = hf_hub_download(HUB_REPO, "data.zip", repo_type="dataset")
    except Exception as exc:
        raise RuntimeError(f"cannot fetch {HUB_REPO} data.zip from the hub ({type(exc).__name__}); "
                           "offline, pass --data_file") from None
    out = {}
    with zipfile.ZipFile(zpath) as zf:
        for ds in datasets:
            member = f"data/{ds}{'_e' if longbench_e else ''}.jsonl"
            text = zf.read(member).decode("utf-8")
            out[ds] = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    return out


def group_rows(rows: list[dict], datasets: list[str] | None, default: str | None) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for i, r in enumerate(rows):
        ds = r.get("dataset") or default
        if not ds:
            raise ValueError(f"row {i} has no 'dataset' field; pass --dataset_name")
        grouped.setdefault(ds, []).append(r)
    if datasets:
        grouped = {d: grouped[d] for d in datasets if d in grouped}
    unknown = [d for d in grouped if d not in METRICS]
    if unknown:
        raise ValueError(f"unknown LongBench dataset(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    return grouped


# ---------------------------------------------------------------- prediction
def build_prompt(tokenizer, template: str, row: dict, max_length: int, chat: bool) -> tuple[torch.Tensor, bool]:
    """Token ids of the prompt, cut in the middle to max_length tokens; (ids, truncated)."""
    prompt = template.format(**{k: (v if isinstance(v, str) else str(v)) for k, v in row.items()
                                if k in ("context", "input")})
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    truncated = len(ids) > max_length
    if truncated:
        half = max_length // 2
        prompt = tokenizer.decode(ids[:half], skip_special_tokens=True) + \
            tokenizer.decode(ids[len(ids) - (max_length - half):], skip_special_tokens=True)
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return torch.tensor([ids]), truncated


@torch.no_grad()
def predict(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                         pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def evaluate_longbench(model, tokenizer, data: dict[str, list[dict]], max_length: int = 3500,
                       max_samples: int = 0, chat: bool = False, prompts: dict | None = None,
                       max_new: dict | None = None, pred_file: Path | None = None) -> dict:
    """Scores (x100) per dataset and their mean, per-length buckets, counts, truncations and notes."""
    prompts, max_new = {**PROMPTS, **(prompts or {})}, {**MAX_NEW_TOKENS, **(max_new or {})}
    scores, buckets, counts, truncs, notes = {}, {}, {}, {}, set()
    was_training = model.training
    model.eval()
    preds_out = []
    t0 = time.perf_counter()
    for ds, rows in data.items():
        rows = rows[:max_samples] if max_samples else rows
        if ds in CHINESE:
            notes.add(NOTES["zh"])
        if METRICS[ds] is code_sim:
            notes.add(NOTES["code"])
        vals, by_len, n_trunc = [], {}, 0
        for row in tqdm(rows, desc=f"LongBench {ds}"):
            ids, truncated = build_prompt(tokenizer, prompts[ds], row, max_length, chat and ds not in FEW_SHOT)
            n_trunc += truncated
            pred = predict(model, tokenizer, ids, max_new[ds])
            s = score_one(ds, pred, row["answers"], row.get("all_classes"))
            vals.append(s)
            if "length" in row:
                by_len.setdefault(length_bucket(int(row["length"])), []).append(s)
            preds_out.append({"dataset": ds, "_id": row.get("_id"), "pred": pred, "answers": row["answers"],
                              "score": s})
        if not vals:
            continue
        scores[ds] = round(100 * sum(vals) / len(vals), 2)
        buckets[ds] = {k: round(100 * sum(v) / len(v), 2) for k, v in sorted(by_len.items())}
        counts[ds], truncs[ds] = len(vals), n_trunc
    model.train(was_training)
    if pred_file:
        Path(pred_file).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds_out),
                                   encoding="utf-8")
    avg = round(sum(scores.values()) / len(scores), 2) if scores else float("nan")
    return {"scores": scores, "avg": avg, "buckets": buckets, "n": counts, "truncated": truncs,
            "notes": sorted(notes), "seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------- model and command line
def build_parser():
    import acur
    p = acur.build_parser()
    p.description = "LongBench on a dense, compressed-in-memory (give an acur.py target) or exported model"
    p.set_defaults(eval_ppl="none")
    g = p.add_argument_group("LongBench")
    g.add_argument("--longbench_datasets", default=None,
                   help="comma list of datasets (default: the 16 English ones; with --data_file: all in the file)")
    g.add_argument("--data_file", default=None, help="local jsonl / JSON list in LongBench's schema (offline)")
    g.add_argument("--dataset_name", default=None, help="dataset of --data_file rows without a 'dataset' field")
    g.add_argument("--longbench_e", action="store_true", help="LongBench-E files (hub) and length buckets")
    g.add_argument("--max_length", type=int, default=3500, help="prompt tokens kept (cut in the middle)")
    g.add_argument("--max_samples", type=int, default=0, help="cap per dataset (0 = all)")
    g.add_argument("--chat_template", action="store_true",
                   help="wrap prompts in the tokenizer's chat template (not for few-shot datasets)")
    g.add_argument("--prompt_config", default=None,
                   help="LongBench's config/ dir (dataset2prompt.json, dataset2maxlen.json) for its exact prompts")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="load custom model code (set automatically for a dir whose config.json has auto_map)")
    g.add_argument("--lb_output", default=None, help="results JSON (default: output_dir/longbench_<name>.json)")
    g.add_argument("--pred_file", default=None, help="also write every prediction as jsonl")
    return p


def load_model_for_longbench(args):
    """(model, tokenizer, info): compressed in memory via acur.run_pipeline when a target is given, an
    exported ACUR repo (remote code) when the dir says so, else the dense model through acur.load_model."""
    import acur
    compress = args.param_ratio_target != -1 or args.ppl_target != -1 or getattr(args, "compress_kv_cache", False)
    if compress:
        model, tok, results = acur.run_pipeline(args)
        return model, tok, {"mode": "compressed in memory", "acur_results": results.get("output_file"),
                            "param_ratio": results.get("param_ratio")}
    cfg = Path(args.model_id) / "config.json"
    remote = args.trust_remote_code or (cfg.is_file() and "auto_map" in json.loads(cfg.read_text()))
    if remote:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import datautils
        device, dtype = datautils.pick_device_dtype(args)
        model = AutoModelForCausalLM.from_pretrained(args.model_id, trust_remote_code=True, dtype=dtype)
        model.to(device).eval()
        tok = AutoTokenizer.from_pretrained(args.model_id, trust_remote_code=True)
        return model, tok, {"mode": "exported repo (trust_remote_code)"}
    dense_args = argparse_copy(args, raw_model=True, calib_seqlen=2, eval_seqlen=2)  # windows unused here
    acur.validate_args(dense_args)
    model, tok, _ = acur.load_model(dense_args)
    return model, tok, {"mode": "dense"}


def argparse_copy(args, **changes):
    import argparse
    return argparse.Namespace(**{**vars(args), **changes})


def load_prompt_config(path: str) -> tuple[dict, dict]:
    d = Path(path)
    files = [d / "dataset2prompt.json", d / "dataset2maxlen.json"]
    for f in files:
        if not f.is_file():
            raise ValueError(f"--prompt_config: {f} not found")
    return json.loads(files[0].read_text(encoding="utf-8")), json.loads(files[1].read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    import acur
    args = build_parser().parse_args(argv)
    try:
        if args.max_length < 16 or args.max_samples < 0:
            raise ValueError("--max_length must be >= 16 and --max_samples >= 0")
        wanted = [d.strip() for d in (args.longbench_datasets or "").split(",") if d.strip()]
        bad = [d for d in wanted if d not in METRICS]
        if bad:
            raise ValueError(f"unknown LongBench dataset(s) {', '.join(bad)}; known: {', '.join(METRICS)}")
        prompts, max_new = load_prompt_config(args.prompt_config) if args.prompt_config else (None, None)
        if args.data_file:
            data = group_rows(read_rows(Path(args.data_file)), wanted or None, args.dataset_name)
            if not data:
                raise ValueError(f"{args.data_file}: no rows of the requested datasets")
        else:  # fetched before any model work, so a missing network fails fast
            data = load_hub(wanted or ENGLISH, args.longbench_e)
        model, tok, info = load_model_for_longbench(args)
    except (ValueError, RuntimeError, acur.UsageError) as exc:
        print(f"eval_longbench.py: error: {exc}", file=sys.stderr)
        return 2
    res = evaluate_longbench(model, tok, data, args.max_length, args.max_samples, args.chat_template,
                             prompts, max_new, args.pred_file)
    out = {"schema": SCHEMA, "model_id": args.model_id, "args": vars(args), "model": info, **res}
    name = args.run_name or re.sub(r"[^\w.\-]", "_", args.model_id)
    path = Path(args.lb_output or Path(args.output_dir) / f"longbench_{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str, ensure_ascii=False), encoding="utf-8")
    for ds, s in res["scores"].items():
        print(f"LongBench {ds:22s} {s:6.2f}  (n={res['n'][ds]}, truncated {res['truncated'][ds]})")
    print(f"LongBench average {res['avg']}; {', '.join(res['notes']) or 'no metric notes'}; results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
