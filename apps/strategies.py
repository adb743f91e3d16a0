"""`edgeprefill strategies`: every prefill strategy (the registry), one line each."""


def add_parser(sub):
    p = sub.add_parser("strategies", help="list the prefill strategies")
    p.set_defaults(run=run)


def run(args):
    from edgeprefill.prefill.registry import STRATEGIES, table

    for (name, summary), spec in zip(table(), STRATEGIES.values()):
        flags = [f"--{o.replace('_', '-')}" for o in spec.options if o != "backend"]
        print(f"{name:34} {summary}" + (f" [{' '.join(flags)}]" if flags else ""))
    return 0
