"""Quantized token embeddings on SmolLM2-135M: checkpoint bytes and quality with float16, int8 and int4 tables.

SmolLM2's tied 49152 × 576 embedding (also its lm_head) is 56.6 MB in float16, half of a 4-bit checkpoint. Rows:
the embedding alone quantized (linears float32: the embedding's own cost; and, to see which side costs, the 4-bit
codes used only by the input lookup or only by the head, the other side kept float — a diagnosis, not a format),
then RTN linears (8-bit per-channel sym, 4-bit g128 asym) with each embedding setting. Eval: the pinned protocol of
``common.py`` (first 20,480 tokens of WikiText-2 test, 10 windows × 2048, no BOS), KL and top-1 against fp32.
Run: ``python bench/embeddings_smollm2.py`` → bench/results/embeddings_smollm2.{md,json}; rows already in the
JSON are kept (delete it to measure everything again). Nothing here asserts.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, RESULTS, eval_windows, reference_logits, write_results  # noqa: E402

EMBEDDINGS = {"float16": None, "int8 g64": 8, "int4 g64": 4}
SIDES = {"int4 g64, input lookup only": "input", "int4 g64, head only": "head"}  # linears float, diagnosis
LINEARS = {"float": None, "8-bit per-channel sym": dict(bits=8, granularity="channel", symmetric=True),
           "4-bit g128 asym": dict(bits=4, group_size=128)}


def _checkpoint_bytes(model: torch.nn.Module, tokenizer: object) -> int:
    """Bytes of the saved safetensors file(s), headers included."""
    from lowbit import save_quantized

    with tempfile.TemporaryDirectory() as tmp:
        out = save_quantized(model, Path(tmp) / "q", tokenizer=tokenizer)
        return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def _one_side(model: torch.nn.Module, side: str) -> None:
    """Quantize SmolLM2's tied table to int4 g64 but use the codes on one ``side`` only (the other keeps the float
    table): which of lookup and head the 4-bit error hurts."""
    from lowbit import QuantConfig, QuantRecipe
    from lowbit.model.embeddings import embedding_target, quantize_embedding

    table = model.get_input_embeddings().weight.detach().clone()
    cfg = QuantConfig(bits=4, symmetric=True, group_size=64)
    quantize_embedding(model, embedding_target(model, QuantRecipe(embeddings=cfg)))
    if side == "input":
        model.lm_head = torch.nn.Linear(table.shape[1], table.shape[0], bias=False)
        model.lm_head.weight.data = table
    else:
        model.model.embed_tokens = torch.nn.Embedding.from_pretrained(table)


def main() -> None:
    from lowbit import QuantConfig, QuantRecipe, load_model, quantize_model
    from lowbit.eval.perplexity import evaluate
    from lowbit.eval.size import size_report
    from lowbit.model.embeddings import embedding_target, quantize_embedding

    loaded = load_model(MODEL)
    windows, protocol = eval_windows(loaded.tokenizer)
    ref = reference_logits(loaded.model, windows)
    path = RESULTS / "embeddings_smollm2.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["linears"], r["embeddings"]) for r in rows}
    todo = [(lin, emb) for lin in LINEARS for emb in [*EMBEDDINGS, *(SIDES if LINEARS[lin] is None else ())]
            if (lin, emb) not in done and (LINEARS[lin] is not None or EMBEDDINGS.get(emb, 0) is not None)]
    for linears, embeddings in todo:
        lin_cfg, bits = LINEARS[linears], EMBEDDINGS.get(embeddings)
        model = copy.deepcopy(loaded.model)
        emb_cfg = None if bits is None else QuantConfig(bits=bits, symmetric=True, group_size=64)
        start = time.perf_counter()
        if embeddings in SIDES:  # a diagnosis: the table is held twice, its size is not a format's
            _one_side(model, SIDES[embeddings])
            tensor_bytes, file_bytes = None, None
        elif lin_cfg is None:  # the embedding alone (no record: sized as a float16 checkpoint would store it)
            quantize_embedding(model, embedding_target(model, QuantRecipe(embeddings=emb_cfg)))
            tensor_bytes, file_bytes = size_report(model).tensor_bytes, None
        else:
            quantize_model(model, QuantRecipe(QuantConfig(**lin_cfg), embeddings=emb_cfg), progress=False)
            tensor_bytes, file_bytes = size_report(model).tensor_bytes, _checkpoint_bytes(model, loaded.tokenizer)
        seconds = time.perf_counter() - start
        result = evaluate(model, windows, protocol, reference=ref, progress=False)
        rows.append(dict(linears=linears, embeddings=embeddings, perplexity=result.perplexity, kl=result.kl,
                         top1=result.top1_agreement, tensor_bytes=tensor_bytes, file_bytes=file_bytes,
                         seconds=seconds, reference_perplexity=result.reference_perplexity))
        print(rows[-1], flush=True)
    order = {(lin, emb): i for i, (lin, emb) in enumerate((lin, emb) for lin in LINEARS
                                                          for emb in [*EMBEDDINGS, *SIDES])}
    rows.sort(key=lambda r: order[(r["linears"], r["embeddings"])])
    table = ["| linears | embedding | perplexity | KL (nats/token) | top-1 | tensor bytes | file bytes |",
             "|---|---|---|---|---|---|---|"]
    show = lambda n: f"{n:,}" if n else "—"  # noqa: E731
    for r in rows:
        table.append(f"| {r['linears']} | {r['embeddings']} | {r['perplexity']:.4f} | {r['kl']:.4f} | "
                     f"{r['top1']:.4f} | {show(r['tensor_bytes'])} | {show(r['file_bytes'])} |")
    intro = (f"SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF; fp32 perplexity "
             f"{rows[0]['reference_perplexity']:.4f}), RTN, min-max q-params. Embedding rows: symmetric, one float16 "
             "scale per 64 hidden dims per token; the tied lm_head computes with the same codes (stored once). "
             "Eval: first 20,480 tokens of wikitext2_test_joined.txt, 10 windows × 2048, no BOS; KL and top-1 "
             "against the fp32 model. 'tensor bytes': what the checkpoint's tensors hold (float parts in float16); "
             "'file bytes': the written model.safetensors, header included.")
    write_results("embeddings_smollm2", "Quantized token embeddings on SmolLM2-135M", intro,
                  [("Quality and size", "\n".join(table))], {"rows": rows})


if __name__ == "__main__":
    main()
