"""Microbench: siblings' second products as one batched product (bmm) against one product per member.

Decides whether modules/fast_layers should batch equal-shape siblings (q/k/v, gate/up): device time per
call (one CUDA graph) of each variant at LLaMA-2-7B's shapes, ratio 0.8, ranks aligned to 64.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_inference import device_us  # noqa: E402
from modules import registry  # noqa: E402


def same(separate, batched, tol: float) -> None:
    """The variants compute one thing: a timing of a wrong variant is worth nothing."""
    want = (torch.stack(separate) if isinstance(separate, list) else separate).float()
    if not torch.allclose(want, batched.float(), rtol=tol, atol=tol):
        raise SystemExit(f"batched and separate products differ: {float((want - batched.float()).abs().max()):.3g}")


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tokens", default="1,16")
    p.add_argument("--shapes", default="4096x4096x3,11008x4096x2", help="out x in x siblings, comma-separated")
    a = p.parse_args(argv)
    dev, dt = torch.device(a.device), torch.float16 if a.device != "cpu" else torch.float32
    tol = 2e-2 if dt == torch.float16 else 1e-4
    for (m, n, G) in (tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")):
        for t in [int(v) for v in a.tokens.split(",")]:
            x = torch.randn(t, n, device=dev, dtype=dt)
            W = [torch.randn(m, n, device=dev, dtype=dt) / n ** 0.5 for _ in range(G)]
            Wst = torch.cat(W)
            res = {"dense_sep": device_us(lambda: [F.linear(x, w) for w in W], dev, a.reps),
                   "dense_stacked": device_us(lambda: F.linear(x, Wst), dev, a.reps)}
            # pair (SVD / CUR folded)
            k = registry.get("svd").rank(m, n, 0.8, 64)
            B = torch.randn(G * k, n, device=dev, dtype=dt) / n ** 0.5
            A = torch.randn(G, m, k, device=dev, dtype=dt) / k ** 0.5
            As = [A[g] for g in range(G)]

            def pair_sep():
                h = F.linear(x, B)
                return [F.linear(h[:, g * k:(g + 1) * k], As[g]) for g in range(G)]

            def pair_bmm():
                h = F.linear(x, B).view(t, G, k).transpose(0, 1)
                return torch.bmm(h, A.transpose(1, 2))
            same(pair_sep(), pair_bmm(), tol)
            res.update(pair_sep=device_us(pair_sep, dev, a.reps), pair_bmm=device_us(pair_bmm, dev, a.reps))
            # row ID
            k = registry.get("rowid").rank(m, n, 0.8, 64)
            B = torch.randn(G * k, n, device=dev, dtype=dt) / n ** 0.5
            Z = torch.randn(G, m - k, k, device=dev, dtype=dt) / k ** 0.5
            Zs = [Z[g] for g in range(G)]
            gidx = torch.randperm(G * m, device=dev)
            W2 = G * k

            def rowid_sep():
                buf = x.new_empty(t, G * m)
                torch.mm(x, B.t(), out=buf[:, :W2])
                for g in range(G):
                    torch.mm(buf[:, g * k:(g + 1) * k], Zs[g].t(), out=buf[:, W2 + g * (m - k):W2 + (g + 1) * (m - k)])
                return buf[:, gidx]

            def rowid_bmm():
                buf = x.new_empty(t, G * m)
                torch.mm(x, B.t(), out=buf[:, :W2])
                h = buf[:, :W2].view(t, G, k).transpose(0, 1)
                zs = torch.bmm(h, Z.transpose(1, 2))  # (G, t, m-k)
                if t == 1:
                    buf[:, W2:].view(G, 1, m - k).copy_(zs)
                    src = buf
                else:
                    src = torch.cat([buf[:, :W2], zs.transpose(0, 1).reshape(t, -1)], 1)
                return src[:, gidx]

            def rowid_bmm_out():
                buf = x.new_empty(t, G * m)
                torch.mm(x, B.t(), out=buf[:, :W2])
                h = buf[:, :W2].view(t, G, k).transpose(0, 1)
                torch.bmm(h, Z.transpose(1, 2), out=buf[:, W2:].view(t, G, m - k).transpose(0, 1))
                return buf[:, gidx]
            same(rowid_sep(), rowid_bmm(), tol)
            res.update(rowid_sep=device_us(rowid_sep, dev, a.reps), rowid_bmm=device_us(rowid_bmm, dev, a.reps))
            if t == 1:
                same(rowid_sep(), rowid_bmm_out(), tol)
                res["rowid_bmm_out"] = device_us(rowid_bmm_out, dev, a.reps)
            # column ID
            k = registry.get("colid").rank(m, n, 0.8, 64)
            C = torch.randn(G, m, k, device=dev, dtype=dt) / k ** 0.5
            Zc = torch.randn(G, k, n - k, device=dev, dtype=dt) / n ** 0.5
            Cs, Zcs = [C[g] for g in range(G)], [Zc[g] for g in range(G)]
            perms = [torch.randperm(n, device=dev) for _ in range(G)]
            pall = torch.cat(perms)

            def colid_sep():
                out = []
                for g in range(G):
                    xp = x[:, perms[g]]
                    z = torch.addmm(xp[:, :k], xp[:, k:], Zcs[g].t())
                    out.append(F.linear(z, Cs[g]))
                return out

            def colid_bmm():
                xp = x[:, pall].view(t, G, n).transpose(0, 1)
                z = torch.baddbmm(xp[..., :k], xp[..., k:], Zc.transpose(1, 2))
                return torch.bmm(z, C.transpose(1, 2))
            same(colid_sep(), colid_bmm(), tol)
            res.update(colid_sep=device_us(colid_sep, dev, a.reps), colid_bmm=device_us(colid_bmm, dev, a.reps))
            print(f"{m}x{n} x{G} tokens {t}: " + "  ".join(f"{kk} {v:.1f}" for kk, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
