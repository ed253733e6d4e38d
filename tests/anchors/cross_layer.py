"""Cross-layer non-local anchors as PyTorch modules, in the structure of each anchor.

Their ``state_dict`` keys are the anchors' own; ``refattn.blocks.cross_layer.
anchor_names(preset, cfg, input_shapes)`` maps refattn's canonical keys onto
them.

* FouriYe/CNL-ICIP2020 ``cnlnet_5CNL.py``, class ``CNL_5``: ``CNL`` is that
  class with its five hard-wired responses generalised to M (``p{m}``,
  ``g{m}``, ``bn{m}`` for m = 0 .. M-1, as the official ``responses[m]``),
  everything else as written: shared bias-free ``t`` (Cq -> P) and ``z``
  (P -> Cq) 1x1 convs, per response ``p{m}``, ``g{m}`` (Ck_m -> P, no bias)
  and ``bn{m} = BatchNorm2d(Cq)``; ``aggregate`` recomputes ``t`` for every
  response, softmax over dim 2 of ``t^T p`` (divided by sqrt(P) with
  ``use_scale``), ``o = att @ g^T`` and ``o.view(N, P, Hq, Wq)`` WITHOUT a
  transpose (``transpose=True`` is the corrected layout); ``forward(responses,
  perspective)`` returns ``sum_m bn_m(z(o_m))``.  Two callables with the
  harness's positional inputs ``(x_q, *x_kv)``:
  ``CNLModule`` (the module alone, ``residual=False``; keys ``t.weight``,
  ``p0.weight``, ...) and ``CNLNetResidual`` (the network's
  ``f8_2 + self.CNL_5([...], f8_2)``, ``residual=True``; the module sits under
  CNLNet's attribute name, so the keys are ``CNL_5.t.weight``, ... as in an
  official CNLNet checkpoint).
* The seed notes' snippet (the project's seed, a survey README):
  ``SeedSnippet`` is the snippet written as given, as a module with
  ``query_conv``, ``key_conv``, ``value_conv`` (key and value both from
  ``x_kv``); its ``fixes`` switch repairs its bugs one by one (reference/
  blocks.md 7.4):

      'softmax_name'  nn.softmax (does not exist) -> F.softmax, implicit dim
                      (PyTorch's rule picks dim 0, the batch, for 3-D input)
      'softmax_dim'   ... -> softmax over dim -1 (the key positions)
      'permute'       q.permute(0, 1, 2) (identity) -> permute(0, 2, 1)
      'product'       att * value (element-wise, raw value) -> bmm(att, V),
                      V = the projected value, (N, HW2, C)
      'view'          out.view(N, C1, H1, W1) -> transpose to (N, C, HW1) first

  With every fix it computes preset ``seed_fixed``.  ``SeedSnippetFixed`` is
  the corrected snippet written cleanly (same names): q/k/v convs with bias,
  softmax over keys, ``bmm(att, V)``, transpose before the reshape.
* ``ReferenceCrossLayer`` (``make_reference``): not an anchor; every refattn
  option (bias, BN mode, both layouts, scale, out_proj, residual, any number
  of key/value layers) with refattn's canonical names (``theta``, ``W``,
  ``kv{m}.phi``, ``kv{m}.g``, ``kv{m}.bn``), written with einsum, as an
  independent check of the option combinations no anchor expresses.

Factories take the config dict (``refattn.blocks.spec.config_to_dict`` of a
RESOLVED ``CrossLayerConfig``, so ``planes`` is an int) plus one
input-derived value, ``input_shapes``: ``{input name: shape}`` for ``x_q``
and ``x_kv`` or ``x_kv.0 ..`` (the golden adapter passes the case's input
shapes under this key).  A factory raises ValueError for a config its anchor
cannot express.  Modules are float64; ``bn='eval'`` returns the module in
eval mode.  Each module's ``forward`` takes ``(x_q, *x_kv)`` positionally
(layer order) and returns the output; it records its attention maps,
detached, in ``last_attention`` (``{m: (N, Lq, Lk_m)}``, refattn's
``aux.attention.{m}``) -- not in the anchors, not in the state_dict.

Known-buggy variants (for the validation tests; each disagrees with refattn):

* ``make_cnl_missing_transpose``: the official code (``o.view`` without the
  transpose) built for a ``layout='transpose'`` config, i.e. the official
  module validated against preset ``cnl``.  The attention maps agree; the
  output, the running statistics and every gradient differ.
* ``make_seed_snippet_crashes_fixed``: the seed snippet with only the edits
  that make it run for any shapes ('softmax_name', 'permute', 'product');
  softmax still over dim 0 (the batch) and the final view still without the
  transpose.  Everything differs from ``seed_fixed``.
* ``make_cnl_softmax_over_queries``: the official structure with the softmax
  over dim 1, the QUERY positions (layout as the config says).  The
  attention (columns sum to 1), the output and every gradient differ.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CNL",
    "CNLModule",
    "CNLNetResidual",
    "ReferenceCrossLayer",
    "SEED_FIXES",
    "SeedSnippet",
    "SeedSnippetFixed",
    "kv_names",
    "make_cnl",
    "make_cnl_missing_transpose",
    "make_cnl_softmax_over_queries",
    "make_reference",
    "make_seed_fixed",
    "make_seed_snippet",
    "make_seed_snippet_crashes_fixed",
]

SEED_FIXES = ("softmax_name", "softmax_dim", "permute", "product", "view")
_NUMBERED = re.compile(r"x_kv\.(\d+)")


# ---------------------------------------------------------------------------
# FouriYe/CNL-ICIP2020, CNL_5 generalised to M responses


class CNL(nn.Module):
    """``CNL_5`` with M responses; ``transpose`` and ``softmax_dim`` are the
    switches for the corrected layout and the buggy variant (official:
    False and 2)."""

    def __init__(self, response_inplanes: list[int], perspective_inplanes: int,
                 planes: int, output_planes: int, use_scale: bool = False, *,
                 transpose: bool = False, softmax_dim: int = 2,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> None:
        self.use_scale = use_scale
        super().__init__()
        self.transpose = transpose
        self.num_responses = len(response_inplanes)
        self.softmax = nn.Softmax(dim=softmax_dim)
        self.t = nn.Conv2d(perspective_inplanes, planes, kernel_size=1, stride=1,
                           bias=False)
        self.z = nn.Conv2d(planes, perspective_inplanes, kernel_size=1, stride=1,
                           bias=False)
        # the official class registers p4, g4, bn4 first, down to p0, g0, bn0
        for m in reversed(range(self.num_responses)):
            setattr(self, f"p{m}", nn.Conv2d(response_inplanes[m], planes,
                                             kernel_size=1, stride=1, bias=False))
            setattr(self, f"g{m}", nn.Conv2d(response_inplanes[m], planes,
                                             kernel_size=1, stride=1, bias=False))
            setattr(self, f"bn{m}", nn.BatchNorm2d(perspective_inplanes, eps=bn_eps,
                                                   momentum=bn_momentum))
        self.last_attention: dict[int, torch.Tensor] = {}

    def aggregate(self, response: torch.Tensor, perspective: torch.Tensor,
                  m: int) -> torch.Tensor:
        t = self.t(perspective)
        b, c, h, w = t.size()
        t = t.view(b, c, -1).permute(0, 2, 1)
        p_f, g_f, bn_f = (getattr(self, f"{n}{m}") for n in ("p", "g", "bn"))
        p = p_f(response)
        g = g_f(response)
        p = p.view(b, c, -1)
        g = g.view(b, c, -1).permute(0, 2, 1)
        att = torch.bmm(t, p)
        if self.use_scale:
            att = att.div(c**0.5)
        att = self.softmax(att)
        self.last_attention[m] = att.detach()
        output = torch.bmm(att, g)
        if self.transpose:
            output = output.permute(0, 2, 1)
        output = output.contiguous()
        output = output.view(b, c, h, w)
        output = bn_f(self.z(output))
        return output

    def forward(self, responses: list[torch.Tensor],
                perspective: torch.Tensor) -> torch.Tensor:
        # the official sums output0 + output1 + ... after computing 4, 3, .., 0
        outputs = {m: self.aggregate(responses[m], perspective, m)
                   for m in reversed(range(self.num_responses))}
        output = outputs[0]
        for m in range(1, self.num_responses):
            output = output + outputs[m]
        return output


class CNLModule(CNL):
    """The ``CNL`` module alone with the harness's inputs ``(x_q, *x_kv)``."""

    def forward(self, x_q: torch.Tensor, *x_kv: torch.Tensor) -> torch.Tensor:
        return super().forward(list(x_kv), x_q)


class CNLNetResidual(nn.Module):
    """CNLNet's ``f8_2 = f8_2 + self.CNL_5([responses], f8_2)``."""

    def __init__(self, cnl: CNL) -> None:
        super().__init__()
        self.CNL_5 = cnl

    @property
    def last_attention(self) -> dict[int, torch.Tensor]:
        return self.CNL_5.last_attention

    def forward(self, x_q: torch.Tensor, *x_kv: torch.Tensor) -> torch.Tensor:
        return x_q + self.CNL_5(list(x_kv), x_q)


# ---------------------------------------------------------------------------
# the seed notes' snippet


class SeedSnippet(nn.Module):
    """The seed notes' cross-layer snippet, line by line, as a module.

    ``fixes`` (a subset of SEED_FIXES) repairs the named bugs; the default,
    none, is the snippet as given (it raises AttributeError at nn.softmax).
    """

    def __init__(self, query_channels: int, key_channels: int, *, bias: bool = True,
                 fixes: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__()
        unknown = sorted(set(fixes) - set(SEED_FIXES))
        if unknown:
            raise ValueError(f"fixes: unknown {unknown}; choose from {SEED_FIXES}")
        self.fixes = frozenset(fixes)
        C = query_channels  # "use 1x1 convs so that the channel counts agree"
        self.query_conv = nn.Conv2d(query_channels, C, 1, bias=bias)
        self.key_conv = nn.Conv2d(key_channels, C, 1, bias=bias)
        self.value_conv = nn.Conv2d(key_channels, C, 1, bias=bias)
        self.last_attention: dict[int, torch.Tensor] = {}

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        value = key  # the block's single key/value layer feeds both
        fix = self.fixes
        N, C1, H1, W1 = query.shape
        _, C2, H2, W2 = key.shape
        q = self.query_conv(query)  # N, C, H1, W1
        k = self.key_conv(key)  # N, C, H2, W2
        v = self.value_conv(value)  # N, C, H2, W2
        C = q.shape[1]
        q_perm = (0, 2, 1) if "permute" in fix else (0, 1, 2)
        if "softmax_name" not in fix:
            # as given: nn.softmax is looked up first, and does not exist
            att = nn.softmax(  # type: ignore[attr-defined]
                torch.bmm(q.view(N, C, H1*W1).permute(0, 1, 2), k.view(N, C, H2 * W2))
            )  # (N, H1*W1, H2*W2)
        else:
            scores = torch.bmm(q.view(N, C, H1 * W1).permute(*q_perm),
                               k.view(N, C, H2 * W2))
            if "softmax_dim" not in fix:
                att = F.softmax(scores)  # implicit dim: 0 for a 3-D tensor (the batch)
            else:
                att = F.softmax(scores, dim=-1)  # (N, H1*W1, H2*W2)
        self.last_attention[0] = att.detach()
        if "product" in fix:
            out = torch.bmm(att, v.view(N, C, H2 * W2).permute(0, 2, 1))  # (N, HW1, C)
        else:
            out = att * value.view(N, C2, H2 * W2).permute(0, 1, 2)  # (N, H1 * W1, C)
        if "view" in fix:
            out = out.permute(0, 2, 1).contiguous()  # (N, C, HW1)
        out = out.view(N, C1, H1, W1)
        return out


class SeedSnippetFixed(nn.Module):
    """The corrected snippet (preset ``seed_fixed``), same parameter names."""

    def __init__(self, query_channels: int, key_channels: int, *,
                 bias: bool = True) -> None:
        super().__init__()
        C = query_channels
        self.query_conv = nn.Conv2d(query_channels, C, 1, bias=bias)
        self.key_conv = nn.Conv2d(key_channels, C, 1, bias=bias)
        self.value_conv = nn.Conv2d(key_channels, C, 1, bias=bias)
        self.last_attention: dict[int, torch.Tensor] = {}

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        value = key
        N, C1, H1, W1 = query.shape
        q = self.query_conv(query).flatten(2).permute(0, 2, 1)  # (N, HW1, C)
        k = self.key_conv(key).flatten(2)  # (N, C, HW2)
        v = self.value_conv(value).flatten(2).permute(0, 2, 1)  # (N, HW2, C)
        att = torch.softmax(torch.bmm(q, k), dim=-1)  # (N, HW1, HW2)
        self.last_attention[0] = att.detach()
        out = torch.bmm(att, v)  # (N, HW1, C)
        return out.permute(0, 2, 1).reshape(N, C1, H1, W1)


# ---------------------------------------------------------------------------
# every refattn option, canonical names


class ReferenceCrossLayer(nn.Module):
    """Every option of refattn's cross_layer block, with the canonical names."""

    def __init__(self, config: dict[str, Any], query_channels: int,
                 key_channels: list[int]) -> None:
        super().__init__()
        self.cfg = config
        P, bias = int(config["planes"]), config["bias"]
        self.theta = nn.Conv2d(query_channels, P, 1, bias=bias)
        if config["out_proj"]:
            self.W = nn.Conv2d(P, query_channels, 1, bias=bias)
        for m, ck in enumerate(key_channels):
            layer = nn.ModuleDict({
                "phi": nn.Conv2d(ck, P, 1, bias=bias),
                "g": nn.Conv2d(ck, P, 1, bias=bias),
            })
            if config["bn"] is not None:
                layer["bn"] = nn.BatchNorm2d(query_channels, eps=config["bn_eps"],
                                             momentum=config["bn_momentum"])
            self.add_module(f"kv{m}", layer)
        self.last_attention: dict[int, torch.Tensor] = {}

    def forward(self, x_q: torch.Tensor, *x_kv: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n, _, hq, wq = x_q.shape
        theta = self.theta(x_q).flatten(2)  # (N, P, Lq)
        P = theta.shape[1]
        total: torch.Tensor | None = None
        for m, x in enumerate(x_kv):
            layer = getattr(self, f"kv{m}")
            phi, g = layer["phi"](x).flatten(2), layer["g"](x).flatten(2)
            f = torch.einsum("npi,npj->nij", theta, phi)
            if cfg["use_scale"]:
                f = f / P**0.5
            attention = torch.softmax(f, dim=-1)
            self.last_attention[m] = attention.detach()
            y_t = torch.einsum("nij,npj->nip", attention, g)  # (N, Lq, P)
            if cfg["layout"] == "transpose":
                y = y_t.transpose(1, 2).reshape(n, P, hq, wq)
            else:
                y = y_t.reshape(n, P, hq, wq)
            z = self.W(y) if cfg["out_proj"] else y
            if cfg["bn"] is not None:
                z = layer["bn"](z)
            total = z if total is None else total + z
        assert total is not None
        return x_q + total if cfg["residual"] else total


# ---------------------------------------------------------------------------
# factories


def kv_names(config: dict[str, Any]) -> list[str]:
    """The key/value input names of ``config['input_shapes']``, in layer order."""
    shapes = _input_shapes(config)
    if "x_kv" in shapes:
        return ["x_kv"]
    return sorted((k for k in shapes if _NUMBERED.fullmatch(k)),
                  key=lambda k: int(k.split(".")[1]))


def _input_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes = config.get("input_shapes")
    if not shapes or "x_q" not in shapes:
        raise ValueError(
            "config: the cross_layer anchor factories need 'input_shapes' "
            "({'x_q': shape, 'x_kv' or 'x_kv.0', ...: shape}) next to the config keys"
        )
    return {k: tuple(int(s) for s in v) for k, v in shapes.items()}


def _channels(config: dict[str, Any]) -> tuple[int, list[int]]:
    shapes = _input_shapes(config)
    return shapes["x_q"][1], [shapes[k][1] for k in kv_names(config)]


def _require(anchor: str, config: dict[str, Any], **wanted: Any) -> None:
    for key, allowed in wanted.items():
        if isinstance(allowed, list):
            ok = config[key] in allowed
        else:
            ok = config[key] == allowed
        if not ok:
            raise ValueError(
                f"config: the {anchor} anchor has no switch for {key}; it needs "
                f"{key}={allowed!r}, got {config[key]!r}"
            )


def _finish(module: nn.Module, config: dict[str, Any]) -> nn.Module:
    module = module.double()
    module.train(config["bn"] != "eval")
    return module


def _cnl(config: dict[str, Any], *, transpose: bool, softmax_dim: int = 2) -> nn.Module:
    _require("CNL_5", config, bias=False, out_proj=True, bn=["train", "eval"])
    cq, cks = _channels(config)
    cls = CNL if config["residual"] else CNLModule
    module = cls(cks, cq, int(config["planes"]), cq, config["use_scale"],
                 transpose=transpose, softmax_dim=softmax_dim,
                 bn_eps=config["bn_eps"], bn_momentum=config["bn_momentum"])
    if config["residual"]:
        module = CNLNetResidual(module)
    return _finish(module, config)


def make_cnl(config: dict[str, Any]) -> nn.Module:
    """The official ``CNL_5`` (M responses), layout from ``config['layout']``;
    wrapped in CNLNet's residual sum when ``residual``."""
    return _cnl(config, transpose=config["layout"] == "transpose")


def _seed_channels(config: dict[str, Any]) -> tuple[int, int]:
    cq, cks = _channels(config)
    if len(cks) != 1:
        raise ValueError(
            f"config: the seed snippet has one key/value layer, got {len(cks)} "
            f"({', '.join(kv_names(config))})"
        )
    if int(config["planes"]) != cq:
        raise ValueError(
            f"config: the seed snippet projects to the query's channels, needs "
            f"planes == Cq ({cq}), got {config['planes']}"
        )
    return cq, cks[0]


def _seed_require(anchor: str, config: dict[str, Any]) -> tuple[int, int]:
    _require(anchor, config, use_scale=False, bn=None, out_proj=False,
             residual=False, layout="transpose")
    return _seed_channels(config)


def make_seed_fixed(config: dict[str, Any]) -> nn.Module:
    """The corrected seed snippet (``bias`` is its only switch)."""
    cq, ck = _seed_require("corrected seed snippet", config)
    return _finish(SeedSnippetFixed(cq, ck, bias=config["bias"]), config)


def make_seed_snippet(config: dict[str, Any],
                      fixes: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """The seed snippet with the bugs in `fixes` repaired (default: as given)."""
    cq, ck = _seed_require("seed snippet", config)
    return _finish(SeedSnippet(cq, ck, bias=config["bias"], fixes=fixes), config)


def make_reference(config: dict[str, Any]) -> nn.Module:
    """Any refattn config (plus ``input_shapes``), canonical names."""
    cq, cks = _channels(config)
    return _finish(ReferenceCrossLayer(config, cq, cks), config)


# ---------------------------------------------------------------------------
# known-buggy variants


def make_cnl_missing_transpose(config: dict[str, Any]) -> nn.Module:
    """The official view-without-transpose, for a ``layout='transpose'`` config."""
    _require("missing-transpose", config, layout="transpose")
    return _cnl(config, transpose=False)


def make_seed_snippet_crashes_fixed(config: dict[str, Any]) -> nn.Module:
    """The seed snippet with only the edits that make it run for any shapes."""
    return make_seed_snippet(config, fixes=("softmax_name", "permute", "product"))


def make_cnl_softmax_over_queries(config: dict[str, Any]) -> nn.Module:
    """The official structure with softmax over dim 1 (the query positions)."""
    return _cnl(config, transpose=config["layout"] == "transpose", softmax_dim=1)
