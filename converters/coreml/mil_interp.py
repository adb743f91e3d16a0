"""A small numpy interpreter for the MIL programs the exporter writes.

coremltools converts on Linux but cannot run a model there, so CI checks each exported function
by executing its MIL program op by op in numpy (float16 where the program says float16) and
comparing with the torch mirror. Only the ops this exporter produces are implemented; anything
else raises `UnsupportedOp` naming it.

    prog = export.load_program("model.mlpackage")
    run = Interpreter(prog)
    outputs, states = run("prefill", {"input_ids": ..., "position": ..., "last_index": ...},
                          states={"key_cache": k, "value_cache": v})
"""

import numpy as np

_DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int32": np.int32,
           "int64": np.int64, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
           "int4": np.int8, "uint4": np.uint8, "uint16": np.uint16, "bool": np.bool_,
           "uint1": np.uint8, "uint2": np.uint8, "uint3": np.uint8, "uint6": np.uint8}


class UnsupportedOp(NotImplementedError):
    """A MIL op or dtype this interpreter does not implement (the message names it)."""


def np_dtype(var):
    """numpy dtype of a pymil Var's element type."""
    from coremltools.converters.mil.mil import types

    t = var.dtype if hasattr(var, "dtype") else var
    name = types.builtin_to_string(t)
    if name not in _DTYPES:
        raise UnsupportedOp(f"MIL dtype {name}")
    return _DTYPES[name]


def _axes(axes, rank):
    return tuple(int(a) % rank for a in np.atleast_1d(axes))


def _softmax(x, axis):
    xf = x.astype(np.float32)
    xf = np.exp(xf - xf.max(axis=axis, keepdims=True))
    return xf / xf.sum(axis=axis, keepdims=True)


def _slice_params(x, p):
    """Python slices from slice_by_index / slice_update parameters."""
    rank = x.ndim
    begin = np.array(p["begin"]).astype(np.int64).reshape(-1)
    end = np.array(p["end"]).astype(np.int64).reshape(-1)
    stride = np.array(p.get("stride") if p.get("stride") is not None else [1] * rank).reshape(-1)
    bm = p.get("begin_mask")
    em = p.get("end_mask")
    sm = p.get("squeeze_mask")
    bm = [False] * rank if bm is None else list(bm)
    em = [False] * rank if em is None else list(em)
    sm = [False] * rank if sm is None else list(sm)
    sl = []
    for d in range(rank):
        b = None if bm[d] else int(begin[d])
        e = None if em[d] else int(end[d])
        if sm[d]:
            sl.append(int(begin[d]))
        else:
            sl.append(slice(b, e, int(stride[d])))
    return tuple(sl)


def _sdpa(p):
    q, k, v = (p[n].astype(np.float32) for n in ("query", "key", "value"))
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    mask = p.get("attn_mask")
    if mask is not None:
        if mask.dtype == np.bool_:
            scores = np.where(mask, scores, -np.inf)
        else:
            scores = scores + mask.astype(np.float32)
    return _softmax(scores, -1) @ v


def _conv(p):
    x, w = p["x"].astype(np.float32), p["weight"].astype(np.float32)
    strides = p.get("strides")
    dil = p.get("dilations")
    groups = int(p.get("groups") or 1)
    if w.shape[2:] != (1, 1) or groups != 1 or (strides is not None and any(np.array(strides) != 1)) \
            or (dil is not None and any(np.array(dil) != 1)):
        raise UnsupportedOp("conv other than 1x1, stride 1, groups 1")
    out = np.einsum("bihw,oi->bohw", x, w[:, :, 0, 0])
    if p.get("bias") is not None:
        out = out + p["bias"].astype(np.float32)[None, :, None, None]
    return out


def _blockwise_shift_scale(p):
    """constexpr_blockwise_shift_scale: (data - offset) * scale, scale/offset broadcast by
    repeating each element over its block."""
    data = p["data"].astype(np.float32)
    scale = p["scale"].astype(np.float32)
    offset = p.get("offset")

    def expand(t):
        for ax in range(data.ndim):
            if t.shape[ax] != data.shape[ax]:
                t = np.repeat(t, data.shape[ax] // t.shape[ax], axis=ax)
        return t

    if offset is not None:
        data = data - expand(offset.astype(np.float32))
    return data * expand(scale)


def _lut_to_dense(p):
    """constexpr_lut_to_dense (iOS 18): indices into per-group lookup tables."""
    indices, lut = p["indices"].astype(np.int64), p["lut"]
    # lut: (*group counts per axis, n_entries, vector_size); indices: the weight's shape
    groups = lut.shape[:-2]
    out = np.empty(indices.shape, dtype=lut.dtype)
    block = [indices.shape[a] // groups[a] for a in range(indices.ndim)]
    for g in np.ndindex(*groups):
        sl = tuple(slice(g[a] * block[a], (g[a] + 1) * block[a]) for a in range(indices.ndim))
        out[sl] = lut[g][indices[sl], 0]
    return out


def _gather(p):
    x, idx = p["x"], p["indices"].astype(np.int64)
    axis = int(p.get("axis", 0))
    bd = int(p.get("batch_dims") or 0)
    if bd:
        raise UnsupportedOp("gather with batch_dims")
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return np.take(x, idx, axis=axis)


def _reduce(fn):
    def run(p):
        x = p["x"]
        axes = p.get("axes")
        keep = bool(p.get("keep_dims", False))
        axes = None if axes is None else _axes(axes, x.ndim)
        return fn(x.astype(np.float32), axis=axes, keepdims=keep)
    return run


def _binary(fn):
    return lambda p: fn(p["x"], p["y"])


def _slice_update(p):
    x = p["x"].copy()
    x[_slice_params(x, p)] = p["update"]
    return x


def _slice_by_size(p):
    x = p["x"]
    begin = np.array(p["begin"]).astype(np.int64)
    size = np.array(p["size"]).astype(np.int64)
    sl = tuple(slice(int(b), None if s == -1 else int(b + s)) for b, s in zip(begin, size))
    return x[sl]


def _split(p):
    x = p["x"]
    axis = int(p["axis"]) % x.ndim
    if p.get("split_sizes") is not None:
        cuts = np.cumsum(np.array(p["split_sizes"]))[:-1]
        return tuple(np.split(x, cuts, axis=axis))
    return tuple(np.split(x, int(p["num_splits"]), axis=axis))


def _reshape(p):
    shape = [int(s) for s in np.array(p["shape"]).reshape(-1)]
    return p["x"].reshape(shape)


def _matmul(p):
    x, y = p["x"].astype(np.float32), p["y"].astype(np.float32)
    if p.get("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if p.get("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return x @ y


def _linear(p):
    out = p["x"].astype(np.float32) @ p["weight"].astype(np.float32).T
    if p.get("bias") is not None:
        out = out + p["bias"].astype(np.float32)
    return out


def _select(p):
    return np.where(p["cond"], p["a"], p["b"])


def _range_1d(p):
    return np.arange(p["start"], p["end"], p["step"])


def _fill(p):
    return np.full([int(s) for s in np.array(p["shape"]).reshape(-1)], p.get("value", 0.0))


def _tile(p):
    return np.tile(p["x"], [int(r) for r in np.array(p["reps"]).reshape(-1)])


def _expand_dims(p):
    x = p["x"]
    for a in sorted(int(a) for a in np.atleast_1d(p["axes"])):
        x = np.expand_dims(x, a if a >= 0 else x.ndim + 1 + a)
    return x


def _squeeze(p):
    axes = p.get("axes")
    x = p["x"]
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=_axes(axes, x.ndim))


def _concat(p):
    vals = p["values"]
    return np.concatenate([np.asarray(v) for v in vals], axis=int(p["axis"]))


def _stack(p):
    return np.stack(p["values"], axis=int(p["axis"]))


def _rsqrt(p):
    eps = float(p.get("epsilon", 1e-12) or 0.0)
    return 1.0 / np.sqrt(p["x"].astype(np.float32) + eps)


OPS = {
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply),
    "real_div": _binary(lambda x, y: np.asarray(x, np.float32) / np.asarray(y, np.float32)),
    "floor_div": _binary(np.floor_divide), "pow": _binary(np.power),
    "maximum": _binary(np.maximum), "minimum": _binary(np.minimum), "mod": _binary(np.mod),
    "equal": _binary(np.equal), "not_equal": _binary(np.not_equal),
    "less": _binary(np.less), "less_equal": _binary(np.less_equal),
    "greater": _binary(np.greater), "greater_equal": _binary(np.greater_equal),
    "logical_and": _binary(np.logical_and), "logical_or": _binary(np.logical_or),
    "logical_not": lambda p: np.logical_not(p["x"]),
    "rsqrt": _rsqrt, "sqrt": lambda p: np.sqrt(p["x"].astype(np.float32)),
    "exp": lambda p: np.exp(p["x"].astype(np.float32)),
    "neg": lambda p: -p["x"], "abs": lambda p: np.abs(p["x"]),
    "square": lambda p: np.square(p["x"].astype(np.float32)),
    "inverse": lambda p: 1.0 / (p["x"].astype(np.float32) + float(p.get("epsilon", 1e-4))),
    "sin": lambda p: np.sin(p["x"].astype(np.float32)),
    "cos": lambda p: np.cos(p["x"].astype(np.float32)),
    "silu": lambda p: (lambda x: x / (1.0 + np.exp(-x)))(p["x"].astype(np.float32)),
    "sigmoid": lambda p: 1.0 / (1.0 + np.exp(-p["x"].astype(np.float32))),
    "clip": lambda p: np.clip(p["x"], p["alpha"], p["beta"]),
    "relu": lambda p: np.maximum(p["x"], 0), "tanh": lambda p: np.tanh(p["x"].astype(np.float32)),
    "softmax": lambda p: _softmax(p["x"], int(p.get("axis", -1))),
    "reduce_mean": _reduce(np.mean), "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max), "reduce_min": _reduce(np.min),
    "reduce_sum_square": _reduce(lambda x, axis, keepdims: np.sum(x * x, axis=axis,
                                                                  keepdims=keepdims)),
    "matmul": _matmul, "linear": _linear, "conv": _conv,
    "scaled_dot_product_attention": _sdpa,
    "reshape": _reshape, "transpose": lambda p: np.transpose(p["x"], [int(a) for a in p["perm"]]),
    "expand_dims": _expand_dims, "squeeze": _squeeze, "concat": _concat, "stack": _stack,
    "split": _split, "tile": _tile, "slice_by_index": lambda p: p["x"][_slice_params(p["x"], p)],
    "slice_by_size": _slice_by_size, "slice_update": _slice_update, "gather": _gather,
    "select": _select, "range_1d": _range_1d, "fill": _fill,
    "shape": lambda p: np.array(p["x"].shape, dtype=np.int32),
    "identity": lambda p: p["x"], "cast": lambda p: p["x"],
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "constexpr_lut_to_dense": _lut_to_dense,
}


class Interpreter:
    """Executes the functions of a pymil Program with numpy."""

    def __init__(self, program):
        self.program = program
        self._const_cache = {}

    def _value(self, env, v):
        if isinstance(v, (list, tuple)):
            return [self._value(env, x) for x in v]
        if v.name in env:
            return env[v.name]
        if v.val is not None:
            return np.asarray(v.val)
        raise KeyError(f"MIL variable {v.name} has no value (its op did not run)")

    def __call__(self, function, inputs, states=None):
        """Run `function` on {input name: array}; states {name: array} are read and, where the
        program updates them, replaced. Returns ({output name: array}, {state name: array})."""
        fn = self.program.functions[function]
        env = {}
        states = {k: np.asarray(v).copy() for k, v in (states or {}).items()}
        for name, var in fn.inputs.items():
            if name in inputs:
                env[name] = np.asarray(inputs[name]).astype(np_dtype(var))
            elif name in states:
                env[name] = states[name]
            else:
                raise KeyError(f"function {function} needs input or state '{name}'")
        for op in fn.operations:
            self._run_op(op, env, states)
        outs = {v.name: env[v.name] for v in fn.outputs}
        return outs, states

    def _run_op(self, op, env, states):
        t = op.op_type
        if t == "const":
            env[op.outputs[0].name] = np.asarray(op.outputs[0].val)
            return
        params = {}
        for k, v in op.inputs.items():
            params[k] = self._value(env, v)
        if t == "read_state":
            env[op.outputs[0].name] = states[op.inputs["input"].name]
            return
        if t == "coreml_update_state":
            name = op.inputs["state"].name
            states[name] = np.asarray(params["value"]).astype(states[name].dtype)
            env[name] = states[name]
            env[op.outputs[0].name] = states[name]
            return
        if t == "cast":
            out = np.asarray(params["x"]).astype(_DTYPES[params["dtype"]] if isinstance(
                params["dtype"], str) else np.asarray(params["dtype"]).item())
            env[op.outputs[0].name] = out
            return
        if t not in OPS:
            raise UnsupportedOp(f"MIL op '{t}' ({op.name}) is not implemented by the numpy "
                                "interpreter")
        if op.outputs and op.outputs[0].val is not None and t.startswith("constexpr"):
            key = op.outputs[0].name  # constexpr outputs are constants: compute once
            if key not in self._const_cache:
                self._const_cache[key] = np.asarray(OPS[t](params)).astype(
                    np_dtype(op.outputs[0]))
            env[key] = self._const_cache[key]
            return
        res = OPS[t](params)
        res = res if isinstance(res, tuple) else (res,)
        for var, val in zip(op.outputs, res):
            env[var.name] = np.asarray(val).astype(np_dtype(var))
