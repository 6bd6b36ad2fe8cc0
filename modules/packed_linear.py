"""Quantized weights held as real bytes (packed integer codes + per-group scales) and the kernels that run them.

Why one definition for simulated and packed: quantization.py quantizes every matrix P (rows = outputs) as
    P_hat = (q - z) * scale            [then * 1/s^a per input column for AWQ]
with integer codes q in [0, 2^b - 1] and an integer zero point z per group. A packed matrix stores q, z,
scale (and 1/s^a) and multiplies by the same P_hat; nothing is re-quantized at load, so the packed model
equals the simulated one up to the floating-point round-off of the kernel that runs it.

Storage, format 1 (device-neutral; what an exported repo's safetensors hold per matrix):
    bits <= 4: qweight uint8 [rows, ceil(cols/2)], byte j = q[2j] << 4 | q[2j+1];   qzero uint8 [rows, groups] = z
    bits 5..8: qweight int8 [rows, cols] = q - 128;                                 qzero int8 [rows, groups] = z - 128
    qscale [rows, groups] float; qinv [cols] float (AWQ only)
so P_hat = (qweight - qzero) * qscale either way (nibbles unpacked first). Groups are `group_size`
consecutive input columns (0 = one per output row); a short last group is an ordinary group.

Kernels, chosen per matrix at the first forward on a (device, dtype) and accepted only after agreeing with
the dequantized weight on a probe input (a kernel that errors or disagrees is never used):
    int4 / int3:  torch's tinygemm (aten._weight_int4pack_mm on CUDA, bf16 activations; the _for_cpu twin on
                  CPU). It computes (c - 8) * scale + zero_f; zero_f = (8 - z) * scale gives (q - z) * scale
                  exactly. Group sizes that are multiples of 32, and per-channel (one scale replicated).
    int5..int8, per output channel: aten._weight_int8pack_mm (x c^T * scale), minus the zero point's
                  rank-one term sum(x) * (scale * zc); else an int8 -> compute-dtype cast and one matmul.
    anything else: dequantize to the compute dtype in every forward (memory stays packed, speed does not):
                  a recorded fallback with a warning.
The part between the markers imports only torch: huggingface_repos/build_acur_repo.py copies it verbatim into
exported repos (acur_packed.py, `modules.runtime_text.runtime_source`), which must load without this project.
"""
from __future__ import annotations

# ===== BEGIN PACKED RUNTIME (self-contained: torch only) =====
import logging
import warnings

import torch
from torch import nn
from torch.nn import functional as F

PACKED_FORMAT = 1  # bump when the stored layout changes
_TINYGEMM_GROUPS = (256, 128, 64, 32)
# relative error ||kernel - dequantized|| / ||dequantized|| a kernel may show on the probe: round-off of the
# dtype, far below what a wrong layout gives (order 1)
_PROBE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_LOG = logging.getLogger("acur_packed")
_WARNED: set[str] = set()


def nibble_packed(bits: int) -> bool:
    """Codes of at most 4 bits are stored two per byte, wider ones one per byte (int8, offset 128)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"packed storage holds 1..8-bit codes, got {bits}")
    return bits <= 4


def group_width(cols: int, group_size: int) -> int:
    """Columns per group: group_size, or all columns for 0 (per output channel) or a group wider than cols."""
    return cols if group_size <= 0 or group_size >= cols else group_size


def n_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_width(cols, group_size))


def pack_codes(q: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, qzero) storage of integer codes q [rows, cols] and zero points [rows, groups] in [0, 2^b - 1]."""
    q = q.to(torch.int16)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2 ** bits):
        raise ValueError(f"codes outside 0..{2 ** bits - 1}")
    if nibble_packed(bits):
        if q.shape[1] % 2:
            q = F.pad(q, (0, 1))
        return ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8), zero.to(torch.uint8)
    return (q - 128).to(torch.int8), (zero.to(torch.int16) - 128).to(torch.int8)


def unpack_codes(qweight: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Stored codes as int16 [rows, cols], in the offset of qzero (q for nibbles, q - 128 for bytes)."""
    if nibble_packed(bits):
        w = qweight.to(torch.int16)
        return torch.stack([w >> 4, w & 15], dim=-1).reshape(w.shape[0], -1)[:, :cols]
    return qweight.to(torch.int16)


def dequantize(qweight: torch.Tensor, qscale: torch.Tensor, qzero: torch.Tensor, bits: int, group_size: int,
               cols: int) -> torch.Tensor:
    """(q - z) * scale as fp32 [rows, cols]: the same operations, in the same order, as the simulation."""
    g = group_width(cols, group_size)
    codes = unpack_codes(qweight, bits, cols).float()
    zero = qzero.float().repeat_interleave(g, dim=1)[:, :cols]
    return (codes - zero) * qscale.float().repeat_interleave(g, dim=1)[:, :cols]


class _NoKernel(Exception):
    """A kernel does not apply to this matrix, device or dtype (the reason is recorded)."""


class PackedMatrix(nn.Module):
    """x -> x P_hat^T for one quantized matrix P held packed (see the module docstring for the layout).

    Persistent buffers are the stored format; the kernel's own layout lives in non-persistent `kernel_*`
    buffers, built by prepare() for one (device, dtype) and rebuilt when either changes. `backend` says
    which kernel runs, `fallback` why a faster one was refused ("" when none was)."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int = 0, awq: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.rows, self.cols, self.bits, self.group_size = rows, cols, bits, group_size
        groups = n_groups(cols, group_size)
        if nibble_packed(bits):
            qweight = torch.zeros(rows, -(-cols // 2), dtype=torch.uint8, device=device)
            qzero = torch.zeros(rows, groups, dtype=torch.uint8, device=device)
        else:
            qweight = torch.zeros(rows, cols, dtype=torch.int8, device=device)
            qzero = torch.zeros(rows, groups, dtype=torch.int8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzero", qzero)
        self.register_buffer("qscale", torch.ones(rows, groups, dtype=dtype, device=device))
        self.register_buffer("qinv", torch.ones(cols, dtype=dtype, device=device) if awq else None)
        self.backend, self.fallback = "", ""
        self._key: tuple | None = None
        self._kernel: dict = {}

    def extra_repr(self) -> str:
        return (f"rows={self.rows}, cols={self.cols}, bits={self.bits}, group_size={self.group_size}, "
                f"awq={self.qinv is not None}, backend={self.backend or 'unprepared'}")

    @torch.no_grad()
    def set_codes(self, q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor,
                  inv: torch.Tensor | None = None) -> "PackedMatrix":
        """Fill the stored format from integer codes q [rows, cols], zeros and scales [rows, groups] (and 1/s^a)."""
        qweight, qzero = pack_codes(q, zero, self.bits)
        self.qweight.copy_(qweight)
        self.qzero.copy_(qzero)
        self.qscale.copy_(scale)
        if (inv is None) != (self.qinv is None):
            raise ValueError("inv given for a matrix built without awq, or missing for one built with it")
        if inv is not None:
            self.qinv.copy_(inv)
        self._key = None
        return self

    def dequantized(self) -> torch.Tensor:
        """(q - z) * scale, fp32 [rows, cols] (without the AWQ input scale)."""
        return dequantize(self.qweight, self.qscale, self.qzero, self.bits, self.group_size, self.cols)

    def dense_weight(self) -> torch.Tensor:
        """P_hat, fp32: what the matrix multiplies by (for checks and reports, not for the forward pass)."""
        w = self.dequantized()
        return w * self.qinv.float() if self.qinv is not None else w

    def packed_bytes(self) -> int:
        """Bytes of the stored format (codes, zeros, scales, AWQ input scale)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzero, self.qscale, self.qinv)
                   if t is not None)

    def kernel_bytes(self) -> int:
        """Bytes the chosen kernel holds beside the stored format (e.g. tinygemm's tiled copy)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False) if n.startswith("kernel_"))

    # ------------------------------------------------------------ kernels
    def _candidates(self, device: torch.device) -> list[str]:
        """Backends to try, fastest first. On CUDA the int8 cast beats torch's int8pack kernel by far
        (H200, bf16, one token: 2048x2048 int8pack 132 us vs 5 us dense; experiments/measured/
        h200_bench_packed_llama-1b.txt), on the CPU int8pack is the faster one."""
        if nibble_packed(self.bits):
            return ["int4_tinygemm", "dequant"]
        if n_groups(self.cols, self.group_size) == 1:
            return (["int8_cast", "int8_pack"] if device.type == "cuda" else ["int8_pack", "int8_cast"]) + ["dequant"]
        return ["dequant"]

    def _set_kernel(self, **tensors) -> None:
        for n in [n for n, _ in self.named_buffers(recurse=False) if n.startswith("kernel_")]:
            delattr(self, n)
        for n, t in tensors.items():
            self.register_buffer("kernel_" + n, t, persistent=False)

    def _prep_tinygemm(self, device: torch.device, dtype: torch.dtype) -> None:
        if device.type == "cuda":
            kdtype, convert = torch.bfloat16, torch.ops.aten._convert_weight_to_int4pack
        elif device.type == "cpu":
            kdtype, convert = dtype, torch.ops.aten._convert_weight_to_int4pack_for_cpu
        else:
            raise _NoKernel(f"no int4 kernel for device {device.type}")
        g = group_width(self.cols, self.group_size)
        if g == self.cols:  # per output channel: one scale, replicated over kernel groups
            gk = 32 if self.cols <= 32 else 64 if self.cols <= 64 else 128
        else:
            gk = next((c for c in _TINYGEMM_GROUPS if g % c == 0), 0)
            if not gk:
                raise _NoKernel(f"group size {g} is not a multiple of 32 (tinygemm groups are 32..256)")
        kpad, npad = -(-self.cols // gk) * gk, -(-self.rows // 16) * 16
        codes = unpack_codes(self.qweight, self.bits, self.cols).to(device=device, dtype=torch.int32)
        codes = F.pad(codes, (0, kpad - self.cols, 0, npad - self.rows))  # padded inputs are zero, rows cut off
        group_of = (torch.arange(kpad // gk, device=device) * gk // g).clamp_max(self.qscale.shape[1] - 1)
        s, z = self.qscale.float()[:, group_of], self.qzero.float()[:, group_of]
        s, z = F.pad(s, (0, 0, 0, npad - self.rows)), F.pad(z, (0, 0, 0, npad - self.rows))
        scale_zero = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(kdtype)
        if device.type == "cuda":
            inner = 8 if kpad % 128 == 0 else 4 if kpad % 64 == 0 else 2
            packed = convert(((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous(), inner)
        else:
            packed = convert(codes.contiguous(), 1)
        self._set_kernel(w=packed, scale_zero=scale_zero)
        self._kernel = {"gk": gk, "kpad": kpad, "dtype": kdtype, "device": device.type}

    def _prep_int8(self, dtype: torch.dtype, backend: str) -> None:
        if backend == "int8_pack" and self.cols % 16:
            # torch 2.13's CPU kernel crashes (not raises) for bf16 inputs whose width is not a multiple of 16
            raise _NoKernel(f"int8pack needs a width divisible by 16, got {self.cols}")
        s = self.qscale[:, 0].float()
        zc = self.qzero[:, 0].float()
        self._set_kernel(scale=s.to(dtype), scale_zero=(s * zc).to(dtype)[None])
        self._kernel = {}

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., cols] -> [..., rows] with the prepared backend (no AWQ scale)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cols)
        if self.backend == "int4_tinygemm":
            k = self._kernel
            xk = x2.to(k["dtype"])
            if k["kpad"] > self.cols:
                xk = F.pad(xk, (0, k["kpad"] - self.cols))
            mm = (torch.ops.aten._weight_int4pack_mm if k["device"] == "cuda"
                  else torch.ops.aten._weight_int4pack_mm_for_cpu)
            y = mm(xk.contiguous(), self.kernel_w, k["gk"], self.kernel_scale_zero)[:, :self.rows].to(x.dtype)
        elif self.backend in ("int8_pack", "int8_cast"):
            x2 = x2.contiguous()
            if self.backend == "int8_pack":
                y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.kernel_scale)
            else:
                y = F.linear(x2, self.qweight.to(x.dtype)) * self.kernel_scale
            # (c - zc) s = c s - zc s: subtract the zero point's rank-one term
            y = torch.addmm(y, x2.sum(-1, keepdim=True), self.kernel_scale_zero, alpha=-1)
        else:
            y = F.linear(x2, self.dequantized().to(x.dtype))
        return y.reshape(*lead, self.rows)

    @torch.no_grad()
    def prepare(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """Choose and build the fastest kernel that applies and agrees with the dequantized weight on a
        probe input; returns the backend name. Refusals are recorded in `fallback`."""
        device = torch.device(device)
        candidates = self._candidates(device)
        reasons = [] if len(candidates) > 1 else [
            f"int8 kernels scale per output channel; this matrix has {n_groups(self.cols, self.group_size)} groups per row"]
        for backend in candidates:
            self.backend = backend
            if backend == "dequant":
                self._set_kernel()
                self._kernel = {}
                break
            try:
                if backend == "int4_tinygemm":
                    self._prep_tinygemm(device, dtype)
                else:
                    self._prep_int8(dtype, backend)
                err = self._probe_error(device, dtype)
            except (_NoKernel, RuntimeError, NotImplementedError, AttributeError) as exc:
                reasons.append(f"{backend}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
                continue
            if err <= _PROBE_TOL.get(dtype, 1e-2):
                break
            reasons.append(f"{backend}: disagrees with the dequantized weight (relative error {err:.2e})")
        self.fallback = "; ".join(reasons) if self.backend == "dequant" else ""
        self._key = (torch.device(device), dtype)
        return self.backend

    def _probe_error(self, device: torch.device, dtype: torch.dtype) -> float:
        x = torch.randn(4, self.cols, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        ref = F.linear(x.double(), self.dequantized().to(device).double())  # fp64: no TF32 in the reference
        err = (self._matmul(x).double() - ref).norm() / ref.norm().clamp_min(1e-30)
        return float(err) if torch.isfinite(err) else float("inf")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._key != (x.device, x.dtype):
            self.prepare(x.device, x.dtype)
            if self.fallback:
                warn_once(f"packed {self.bits}-bit weights on {x.device.type}/{x.dtype}: no kernel applies "
                          f"({self.fallback}); dequantizing in every forward (correct, slower)")
        if self.qinv is not None:
            x = x * self.qinv.to(x.dtype)
        return self._matmul(x)


class PackedLinear(PackedMatrix):
    """nn.Linear whose weight is held packed: y = x W_hat^T + b."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 0, awq: bool = False,
                 bias: bool = True, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(out_features, in_features, bits, group_size, awq, dtype, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + self.bias if self.bias is not None else y


class PackedCURLinear(nn.Module):
    """CURLinear (y = C (U (R x)) + b) whose three factors are held packed; kept indices as in CURLinear."""

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, group_size: int = 0,
                 awq_parts: tuple[str, ...] = (), bias: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = dict(bits=bits, group_size=group_size, dtype=dtype, device=device)
        self.R = PackedMatrix(rank, in_features, awq="R" in awq_parts, **kw)
        self.U = PackedMatrix(rank, rank, awq="U" in awq_parts, **kw)
        self.C = PackedMatrix(out_features, rank, awq="C" in awq_parts, **kw)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_buffer("col_indices", torch.zeros(rank, dtype=torch.long, device=device))
        self.register_buffer("row_indices", torch.zeros(rank, dtype=torch.long, device=device))
        self.fallback = ""

    def dense_weight(self) -> torch.Tensor:
        return self.C.dense_weight() @ self.U.dense_weight() @ self.R.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.C(self.U(self.R(x)))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def warn_once(message: str) -> None:
    """A fallback is loud: a Python warning and a log line, once per message per process."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        _LOG.warning(message)


def install_packed_layers(model: nn.Module, spec: dict) -> None:
    """Replace every layer named in config.packed_quant["layers"] by an empty packed layer: a CURLinear (already
    installed from config.lowrank_layers) by a PackedCURLinear, an nn.Linear by a PackedLinear."""
    if spec.get("format") != PACKED_FORMAT:
        raise ValueError(f"config.packed_quant has format {spec.get('format')!r}; this acur_packed.py reads "
                         f"format {PACKED_FORMAT}")
    bits, group_size = int(spec["bits"]), int(spec.get("group_size", 0))
    for name, layer in spec["layers"].items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr, None)
        parts = layer.get("parts", {})
        awq = tuple(p for p, v in parts.items() if v.get("awq"))
        if set(parts) == {"W"} and isinstance(old, nn.Linear):
            new = PackedLinear(old.in_features, old.out_features, bits, group_size, bool(awq), old.bias is not None,
                               dtype=old.weight.dtype, device=old.weight.device)
        elif set(parts) == {"C", "U", "R"} and all(isinstance(getattr(old, p, None), torch.Tensor) for p in "CUR"):
            new = PackedCURLinear(old.in_features, old.out_features, old.rank, bits, group_size, awq,
                                  old.bias is not None, dtype=old.C.dtype, device=old.C.device)
        else:
            raise ValueError(f"config.packed_quant names {name!r} with parts {sorted(parts)}, but the model holds "
                             f"{type(old).__name__} there")
        setattr(parent, attr, new)


@torch.no_grad()
def prepare_packed(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Build every packed matrix's kernel where its buffers live, for the model's compute dtype (that of its
    input embeddings unless given). Returns {backend: matrices}; warns once when any matrix falls back."""
    if dtype is None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        dtype = emb.weight.dtype if emb is not None else None
    counts: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, PackedMatrix) and m.qweight.device.type != "meta":
            b = m.prepare(m.qweight.device, dtype or m.qscale.dtype)
            counts[b] = counts.get(b, 0) + 1
            if m.fallback:
                reasons[m.fallback] = reasons.get(m.fallback, 0) + 1
    if reasons:
        worst = max(reasons, key=reasons.get)
        warn_once(f"{sum(reasons.values())} of {sum(counts.values())} packed matrices have no kernel on this "
                  f"device/dtype and dequantize in every forward (correct, slower); e.g. {worst}")
    model.packed_backends = counts
    return counts


def packed_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of the packed matrices' stored format and of their kernels' extra copies."""
    mats = [m for m in model.modules() if isinstance(m, PackedMatrix)]
    return {"packed_bytes": sum(m.packed_bytes() for m in mats), "kernel_bytes": sum(m.kernel_bytes() for m in mats),
            "matrices": len(mats)}
# ===== END PACKED RUNTIME =====

# what tools copy it by (modules/runtime_text.runtime_source): the marker name and the copy's docstring
RUNTIME_MARK = "PACKED RUNTIME"
RUNTIME_DOC = "Packed quantized weights of this repo and their kernels (copied from CUR4LLM modules/packed_linear.py).\n\nStored: integer codes (int8, or two 4-bit codes per uint8), per-group scales and zero points;\nrun with torch's int4 / int8 kernels where they apply, else dequantized per forward (warned)."
