"""How reports look to people (rich, on stdout). JSON needs none of this: results.to_json_dict."""

from __future__ import annotations

import re

__all__ = ["text", "kv_table", "decision_table", "train", "keygen", "embed", "export", "attack", "inspect", "decision",
           "scan", "dispute"]


def text(value: object) -> str:
    """What a file or a suspect holds (a path, a name, metadata, a note quoting them), as text to
    print: control characters escaped (a newline or a terminal escape sequence in a name stays
    inert and on one line) and rich markup escaped (`[/]` alone ends a run with an error)."""
    from rich.markup import escape

    from ..errors import shown

    return escape(shown(value))


def fmt_p(p: float) -> str:
    """p to three significant digits, rounded up: a p just above alpha never shows as alpha
    (1.0007e-09 had shown as 1e-09 beside NOT DETECTED at alpha 1e-09)."""
    from decimal import ROUND_CEILING, Context

    return f"{float(Context(prec=3, rounding=ROUND_CEILING).create_decimal(repr(p))) if 0 < p < 1 else p:.3g}"


def kv_table(title: str, rows: list[tuple[str, object]]):
    """A two-column table. Everything in it is `text`: paths, names and metadata read
    from a file."""
    from rich.table import Table

    table = Table(title=text(title), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # (a long word, as a commitment, on two lines: never cut with "...")
    for k, v in rows[:_MAX_ROWS]:
        table.add_row(text(k), text(_brief(_cell(v))))
    if len(rows) > _MAX_ROWS:  # (a file may hold 300,000 metadata fields: rich took minutes on them)
        table.add_row("...", f"{len(rows) - _MAX_ROWS} more (every one in --json)")
    return table


_MAX_ROWS, _MAX_CELL = 200, 2000  # what a table shows of what a file holds
# a byte of a name that is not UTF-8 as Python writes it inside a container ('\udcff'), not after
# an escaped backslash (a name that holds the text itself)
_WRITTEN_SURROGATE = re.compile(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")


def _cell(value: object) -> str:
    """A value as the table shows it: a container as Python writes it, with a byte of a name
    that is not UTF-8 as that byte, \\xff, as everywhere else (the class folders' names)."""
    if isinstance(value, (dict, list, tuple)):
        return _WRITTEN_SURROGATE.sub(r"\1\\x\2", str(value))
    return str(value)


def _brief(text: str) -> str:
    return text if len(text) <= _MAX_CELL else f"{text[:_MAX_CELL]}... ({len(text)} characters: every one in --json)"


def decision_table(report):
    from rich.table import Table

    verdict = "[bold green]DETECTED[/]" if report.detected else "[bold red]NOT DETECTED[/]"
    table = Table(title=f"{verdict}  p = {fmt_p(report.p_value)}  (alpha = {report.alpha:g})",
                  title_justify="left", caption_justify="left",
                  caption=f"{text(report.meaning())}\nbundle commitment {report.commitment}")
    for col in ("scheme", "where", "evidence", "p-value", "decision"):
        table.add_column(col)
    for r in report.results:
        table.add_row(r.scheme, *map(text, r.evidence()), fmt_p(r.p_value),
                      "detected" if r.detected else "no verdict" if r.unread else "not detected")
    return table


def decision(c, r) -> None:
    c.print(decision_table(r))
    for res in r.results:
        # soft_wrap: a long bit string stays one line that can be copied whole
        if getattr(res, "bits", ""):
            c.print(f"{res.scheme} bits: {res.bits}", soft_wrap=True, highlight=False)
        if getattr(res, "message", None):  # decoded from a suspect's bits: text, said to be garbled when it is
            wrong = getattr(res, "message_errors", None)
            c.print(f"{res.scheme} message: {res.message!r}"
                    + (f" (read with {wrong} of its bits wrong)" if wrong else ""), soft_wrap=True, markup=False)
        if getattr(res, "note", None):  # (a warning goes to stderr: emit_decision)
            c.print(f"[yellow]note:[/] {text(res.note)}")


def scan(c, r) -> None:
    """One row per suspect: its verdict and evidence, or why it could not be read."""
    from rich.table import Table

    table = Table(title=f"{r.command}: {len(r.detected)} of {len(r.rows)} suspects detected "
                        f"(alpha = {r.alpha:g})", title_justify="left", caption_justify="left",
                  caption=f"bundle commitment {r.commitment}; {len(r.rows) / max(r.seconds, 1e-9):.1f} "
                          "suspects/s")
    for col in ("suspect", "verdict", "p-value"):
        table.add_column(col, no_wrap=True)  # a path stays whole, to copy
    table.add_column("evidence")
    for row in r.rows:
        d = row.decision
        if d is None:
            table.add_row(text(row.model), "[bold yellow]ERROR[/]", "-", text(row.error or ""))
            continue
        evidence = "; ".join(f"{x.scheme}: {x.evidence()[1]}" for x in d.results)
        table.add_row(text(row.model), _verdict(d),
                      fmt_p(d.p_value), text(evidence))
    c.print(table)


def dispute(c, r) -> None:
    """The cross matrix (rows: whose keys; columns: whose model), the commitments, the reading."""
    from rich.table import Table

    table = Table(title=f"dispute: whose keys detect whose model (alpha = {r.alpha:g})", title_justify="left")
    table.add_column("keys of \\ model of", style="bold")
    for p in r.parties:
        table.add_column(f"{text(p.name)}: {text(p.model)}")
    for control in r.controls:
        table.add_column(f"control: {text(control)}")
    for p, row, checks in zip(r.parties, r.matrix, r.checked or [[] for _ in r.parties], strict=True):
        table.add_row(text(p.name), *[
            f"{_verdict(d)}  p = {fmt_p(d.p_value)}"
            for d in [*row, *checks]])
    c.print(table)
    for p in r.parties:
        c.print(f"{text(p.name)}: keys {text(p.keys)}, commitment {p.commitment}", highlight=False)
    c.print(f"[bold]{text(r.reading)}[/]")
    c.print("a claim counts only if its commitment was published before the dispute (keygen and "
            "embed print the claim record to publish); keys can be fitted to a model one holds, so of two "
            "commitments the one published first decides, whatever this reading says", highlight=False)


def train(c, r) -> None:
    c.print(kv_table("trained", [
        ("architecture", r.arch), ("data", r.data), ("epochs", r.epochs),
        ("test accuracy", f"{r.test_accuracy:.2f}%"),
        ("seconds / epoch", f"{r.seconds_per_epoch:.3f}"), ("written", r.out)]))


def claim(c, record: dict) -> None:
    """The claim record, as one JSON line to copy and publish with the model."""
    import json

    c.print("claim record (publish it with the model; nothing in it is secret):", highlight=False)
    c.print(json.dumps(record, sort_keys=True), soft_wrap=True, highlight=False, markup=False)


def commitment(c, value: str, label: str = "commitment (SHA-256)") -> None:
    """A commitment on a line of its own, never wrapped nor cut: it is copied to be published
    (inside a table of 80 columns it had been cut short with "...")."""
    c.print(f"{label}: {value}", soft_wrap=True, highlight=False, markup=False)


def keygen(c, r) -> None:
    c.print(kv_table("key bundle sealed", [
        ("schemes", ", ".join(r.schemes)), ("key id", r.key_id), ("written", r.out)]))
    commitment(c, r.commitment)
    claim(c, r.claim)


def embed(c, r) -> None:
    rows = [("accuracy before", f"{r.accuracy_before:.2f}%"),
            ("accuracy after", f"{r.accuracy_after:.2f}%")]
    for name, s in r.schemes.items():
        read = s.get("read_back", "-")
        if s.get("read_back_p") is not None:  # (the p-value says whether it took: a count alone does not)
            read += f", p = {s['read_back_p']:.2g}" + ("" if s.get("detected", True) else
                                                        ": not enough to claim" if s.get("took", True) else
                                                        ": did not take")
        rows += [(f"{name}: epochs", s["epochs"]), (f"{name}: read back", read)]
    rows += [("written", r.out)] + ([("ONNX", r.onnx)] if r.onnx else [])
    rows += [("keys updated", r.keys)]
    c.print(kv_table("watermark embedded", rows))
    commitment(c, r.commitment, "new commitment (SHA-256)")
    claim(c, r.claim)


def export(c, r) -> None:
    c.print(kv_table("exported", [
        ("written", r.out), ("opset", r.opset), ("input", r.input_shape),
        ("max |onnx - torch|", f"{r.max_abs_diff:.2e}"), ("checker", r.checker)]))


def attack(c, r) -> None:
    rows = [("attack", r.attack), ("model", r.model), ("data", r.data), ("seed", r.seed),
            ("accuracy before", f"{r.accuracy_before:.2f}%"),
            ("accuracy after", f"{r.accuracy_after:.2f}%")]
    rows += [(k, v) for k, v in r.params.items()]
    rows += [("seconds", f"{r.seconds:.2f}"), ("written", r.out)]
    c.print(kv_table("attacked", rows))


def _verdict(decision, short: bool = False) -> str:
    if decision is None:
        return "-"
    if decision.detected:
        return "[bold green]yes[/]" if short else "[bold green]DETECTED[/]"
    if decision.results and all(r.unread for r in decision.results):  # (read by none of its schemes)
        return "no verdict"
    return "no" if short else "not detected"


def sweep(c, r) -> None:
    """One row per strength (the victim first): accuracy, each scheme's evidence, the verdicts."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    param = r.param.replace("_", "-")
    settings = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in r.params.items())
    table = Table(title=f"attack {r.attack}, --{param} swept: what the owner's keys read (alpha = {r.alpha:g})",
                  title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption=f"{text(r.model)}, data {text(r.data)}, seed {r.seed}"
                  + (f"; {text(settings)}" if settings else "")
                  + f"\nbundle commitment {r.commitment}" + (f"; plot: {text(r.plot)}" if r.plot else ""))
    schemes = [x.scheme for x in r.rows[0].extract.results]
    # the attack's own results that are numbers (sparsity, samples, ...), one column each
    numbers = [k for k, v in (r.rows[-1].results if len(r.rows) > 1 else {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    header = [param, "acc"] + [k.replace("_", " ") for k in numbers] + [f"{scheme} (p)" for scheme in schemes] \
        + ["extract", "verify"]
    rows = []
    for row in r.rows:
        cells = ["victim" if row.value is None else str(row.value), f"{row.accuracy:.1f}%"]
        cells += ["-" if k not in row.results else f"{row.results[k]:.4g}" for k in numbers]
        for scheme in schemes:
            res = next(x for x in row.extract.results if x.scheme == scheme)
            cells.append(f"{text(res.brief())} ({res.p_value:.2g})")
        rows.append(cells + [_verdict(row.extract, short=True), _verdict(row.verify, short=True)])
    widths = []
    for i, name in enumerate(header):  # every cell whole: the widths the cells need
        widths.append(max(len(name), *(len(Text.from_markup(cells[i]).plain) for cells in rows)))
        table.add_column(name, no_wrap=True, min_width=widths[-1],
                         justify="right" if 1 <= i <= len(numbers) + 1 else "left")
    for cells in rows:
        table.add_row(*cells)
    # as wide as its columns, even past the terminal's edge (which then wraps the lines): cropped
    # to 80 columns, a three-scheme table lost its verdicts without a mark
    c.width = max(c.width, sum(widths) + 3 * len(widths) + 2)  # (print's own width may not pass the console's)
    c.print(table, crop=False)


def inspect(c, r) -> None:
    facts = dict(r.facts)
    value = facts.pop("commitment", None) if r.kind == "key bundle" else None
    c.print(kv_table(f"{r.kind}: {r.path}", list(facts.items())))
    if value is not None:
        commitment(c, value)
