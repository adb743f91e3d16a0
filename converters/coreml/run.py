"""Run an exported package: Core ML itself on macOS, the numpy MIL interpreter elsewhere.

    from converters.coreml.run import PackageRunner
    runner = PackageRunner("smollm2.mlpackage")          # backend: coreml on a Mac
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tokens = runner.generate(ids, max_tokens=16)          # prefill chunks, then decode steps
    print(tokenizer.decode(tokens))

Every function shares the key_cache / value_cache state, so one state made once carries the
prompt from `prefill` (or `kvp_prefill`) into `decode`.
"""

import platform

import numpy as np


class PackageRunner:
    """Args:
        path: the .mlpackage.
        backend: 'coreml' (macOS), 'interpreter' (numpy, anywhere) or 'auto'.
        compute_units: for Core ML: 'ane' (CPU + Neural Engine), 'gpu' or 'all'.
    """

    def __init__(self, path, backend="auto", compute_units="ane"):
        if backend == "auto":
            backend = "coreml" if platform.system() == "Darwin" else "interpreter"
        self.backend = backend
        self.path = str(path)
        if backend == "coreml":
            import coremltools as ct

            from converters.coreml.export import COMPUTE_UNITS

            cu = getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units])
            self.models = {f: ct.models.MLModel(self.path, function_name=f, compute_units=cu)
                           for f in self._functions()}
            self.state = self.models["decode"].make_state()
        else:
            from converters.coreml.export import load_program
            from converters.coreml.mil_interp import Interpreter
            from converters.coreml.verify import empty_states

            prog = load_program(self.path)
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

    def generate(self, ids, max_tokens=16, kvp=False, eos=()):
        """Greedy tokens after the prompt `ids` (kvp: aux + predictor for ids[:-1], then the
        base step on the last token)."""
        if kvp:
            self.prefill(ids[:-1], "kvp_prefill")
            logits = self.decode(ids[-1])
        else:
            logits = self.prefill(ids)
        out = []
        for _ in range(max_tokens):
            tok = int(np.argmax(np.asarray(logits).reshape(-1)))
            if tok in eos:
                break
            out.append(tok)
            logits = self.decode(tok)
        return out
