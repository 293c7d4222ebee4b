"""A strict reader of Prometheus' text exposition format 0.0.4 (what node_exporter's textfile
collector accepts), for tests: every line must be a HELP, TYPE or comment line or a sample, a
family's TYPE comes before its samples, and a family's samples are contiguous."""

import re

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
SAMPLE = re.compile(rf"({NAME})(?:\{{((?:{LABEL},?)*)\}})? (\S+)(?: (-?\d+))?")
VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|NaN|[+-]Inf")
TYPES = {"counter", "gauge", "summary", "histogram", "untyped"}
SUFFIXES = {"summary": ("_sum", "_count", ""), "histogram": ("_bucket", "_sum", "_count")}


class FormatError(ValueError):
    pass


def _unescape(v):
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def parse(text):
    """{family: {"type", "help", "samples": [(name, {label: value}, float)]}}; raises FormatError
    naming the line."""
    families, current, done = {}, None, set()
    if text and not text.endswith("\n"):
        raise FormatError("the text does not end with a newline")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(rf"# (HELP|TYPE) ({NAME}) (.*)", line)
        if m:
            kind, name, rest = m.groups()
            fam = families.setdefault(name, {"type": "untyped", "help": None, "samples": []})
            if kind == "TYPE":
                if rest not in TYPES:
                    raise FormatError(f"line {n}: unknown type {rest!r}")
                if fam.get("typed") or fam["samples"]:
                    raise FormatError(f"line {n}: TYPE of {name} again or after its samples")
                fam["type"], fam["typed"] = rest, True
            else:
                if fam["help"] is not None:
                    raise FormatError(f"line {n}: HELP of {name} twice")
                fam["help"] = rest
            continue
        if line.startswith("#"):
            continue
        m = SAMPLE.fullmatch(line)
        if not m or not VALUE.fullmatch(m.group(5)):
            raise FormatError(f"line {n}: not a sample: {line!r}")
        name, labels = m.group(1), dict((k, _unescape(v)) for k, v in re.findall(LABEL, m.group(2) or ""))
        family = next(
            (
                name[: len(name) - len(s)]
                for f in families.values()
                for s in SUFFIXES.get(f["type"], ())
                if s and name.endswith(s) and families.get(name[: len(name) - len(s)]) is f
            ),
            name,
        )
        if family != current:
            if family in done:
                raise FormatError(f"line {n}: samples of {family} are not together")
            if current:
                done.add(current)
            current = family
        families.setdefault(family, {"type": "untyped", "help": None, "samples": []})["samples"].append(
            (name, labels, float(m.group(5)))
        )
    for f in families.values():
        f.pop("typed", None)
    return families


def value(families, name, **labels):
    """The one sample `name` whose labels include `labels`."""
    hits = [
        v
        for fam in families.values()
        for (n, ls, v) in fam["samples"]
        if n == name and all(ls.get(k) == str(x) for k, x in labels.items())
    ]
    if len(hits) != 1:
        raise AssertionError(f"{len(hits)} samples {name}{labels}")
    return hits[0]
