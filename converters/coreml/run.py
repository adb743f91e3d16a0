"""Run an exported package: Core ML itself on macOS, the numpy MIL interpreter elsewhere.

    from edgeprefill.converters.coreml.run import PackageRunner
    runner = PackageRunner("smollm2.mlpackage")          # backend: coreml on a Mac
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tokens = runner.generate(ids, max_tokens=16)          # prefill chunks, then decode steps
    print(tokenizer.decode(tokens))
    tokens = runner.generate(ids, kvp=True, tail=32)      # KV Prediction (a fresh runner)

Every function shares the key_cache / value_cache state, so one state made once carries the
prompt from `prefill` (or `kvp_prefill`) into `decode`.
"""

import platform

import numpy as np


def empty_states(program):
    """Zero float16 states of the shapes the program declares."""
    fn = next(iter(program.functions.values()))
    out = {}
    for name, var in fn.inputs.items():
        if "state" in str(var.sym_type).lower():
            out[name] = np.zeros(var.sym_type.wrapped_type().get_shape(), dtype=np.float16)
    return out


class PackageRunner:
    """Args:
        path: the .mlpackage.
        backend: 'coreml' (macOS), 'interpreter' (numpy, anywhere) or 'auto'.
        compute_units: for Core ML: 'ane' (CPU + Neural Engine), 'gpu' or 'all'.
        program: for the interpreter, the package's program if already loaded.
    """

    def __init__(self, path, backend="auto", compute_units="ane", program=None):
        if backend == "auto":
            backend = "coreml" if platform.system() == "Darwin" else "interpreter"
        self.backend = backend
        self.path = str(path)
        if backend == "coreml":
            import coremltools as ct

            from edgeprefill.converters.coreml.export import COMPUTE_UNITS

            cu = getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units])
            self.models = {f: ct.models.MLModel(self.path, function_name=f, compute_units=cu)
                           for f in self._functions()}
            self.state = self.models["decode"].make_state()
        else:
            from edgeprefill.converters.coreml.export import load_program
            from edgeprefill.converters.coreml.mil_interp import Interpreter

            prog = program if program is not None else load_program(self.path)
            self.interp = Interpreter(prog)
            self.state = empty_states(prog)
        self.chunk = self._chunk_len()
        self.position = 0

    def _functions(self):
        import coremltools as ct

        spec = ct.utils.load_spec(self.path)
        return [f.name for f in spec.description.functions]

    def _chunk_len(self):
        if self.backend == "coreml":
            spec = self.models["prefill"].get_spec()
            for inp in spec.description.input:
                if inp.name == "input_ids":
                    return int(inp.type.multiArrayType.shape[-1])
        fn = self.interp.program.functions["prefill"]
        return int(fn.inputs["input_ids"].shape[-1])

    def _call(self, function, feeds):
        if self.backend == "coreml":
            return self.models[function].predict(feeds, state=self.state)
        out, self.state = self.interp(function, feeds, self.state)
        return out

    def prefill(self, ids, function="prefill"):
        """Run the prompt through `function` in fixed chunks (the last one padded); returns the
        last token's logits (prefill) or None (kvp_prefill: its last token goes to decode)."""
        logits = None
        for s in range(0, len(ids), self.chunk):
            part = [int(x) for x in ids[s:s + self.chunk]]
            feeds = {"input_ids": np.array([part + [0] * (self.chunk - len(part))], np.int32),
                     "position": np.array([self.position], np.int32)}
            if function == "prefill":
                feeds["last_index"] = np.array([len(part) - 1], np.int32)
                logits = self._call(function, feeds)["logits"]
            else:
                self._call(function, feeds)
            self.position += len(part)
        return logits

    def decode(self, token):
        """One token at the next position; its logits."""
        feeds = {"input_ids": np.array([[int(token)]], np.int32),
                 "position": np.array([self.position], np.int32),
                 "last_index": np.array([0], np.int32)}
        self.position += 1
        return self._call("decode", feeds)["logits"]

    def kvp_prefill(self, ids, tail=1):
        """KV Prediction of the prompt `ids`: kvp_prefill (aux + predictor) over all but its
        last `tail` tokens, then the base over those, attending to the predicted cache
        (`decode` for one token, `prefill` for more; the pair's card names its tail, the
        paper's is 1). Returns the last token's logits."""
        if tail < 1:
            raise ValueError(f"tail must be >= 1 (got {tail})")
        t = min(tail, len(ids))
        if len(ids) > t:
            self.prefill(ids[:-t], "kvp_prefill")
        if t == 1 and "decode" in self._function_names():
            return self.decode(ids[-1])
        return self.prefill(ids[-t:])

    def _function_names(self):
        return set(self.models if self.backend == "coreml" else self.interp.program.functions)

    def generate(self, ids, max_tokens=16, kvp=False, eos=(), tail=1):
        """Greedy tokens after the prompt `ids` (kvp: KV Prediction with an exact `tail`, see
        kvp_prefill)."""
        logits = self.kvp_prefill(ids, tail) if kvp else self.prefill(ids)
        out = []
        for _ in range(max_tokens):
            tok = int(np.argmax(np.asarray(logits).reshape(-1)))
            if tok in eos:
                break
            out.append(tok)
            logits = self.decode(tok)
        return out
