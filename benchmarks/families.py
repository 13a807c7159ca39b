"""What works for each model family: every stage, solver, estimator, transform and export of mixq run on a tiny
random-weight model of the family (built from transformers' own config class, mixq.testing), each marked as it
came out: ✓ (it ran and, where it has one, passed its check), or the one-line refusal mixq gives.

    python benchmarks/families.py        → benchmarks/results/families.md

Checks: quantize (profile → allocate → apply → save → mixq.load gives the packed model's logits exactly); rotate
and resq keep the float model's logits; an export reads back (transformers, from the GGUF or the compressed-tensors
folder) to the saved model's logits (GPT-NeoX's GGUF, which transformers does not read, in mixq's reader). The GGUF
export is tried from a GGUF of the family (written by mixq.testing, loaded as the float model: the export keeps its
metadata) and from the folder (metadata from the config, tokenizer from tokenizer.json)."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import mixq  # noqa: E402
from common import provenance  # noqa: E402
from mixq.chain import Chain  # noqa: E402
from mixq.cli import app  # noqa: E402
from mixq.config import Calibration, QuantizeConfig  # noqa: E402
from mixq.formats import QuantSpec  # noqa: E402
from mixq.models import adapter_for, load_model  # noqa: E402
from mixq.plan import Budget, Candidate, Plan  # noqa: E402
from mixq.sensitivity import ESTIMATORS  # noqa: E402
from mixq.solvers import SOLVERS  # noqa: E402
from mixq.testing import (ENCODERS, FAMILIES, make_byte_tokenizer, make_family_model,  # noqa: E402
                          make_wordpiece_tokenizer, word_text, write_sentence_folder, write_tiny_gguf)
from mixq.transforms import TRANSFORMS, apply_transforms  # noqa: E402

OUT = HERE / "results" / "families.md"
runner = CliRunner()
IDS = torch.randint(5, 80, (2, 32), generator=torch.Generator().manual_seed(0))  # (ids every tokenizer has)


def logits(model):
    """A decoder's logits, an encoder's sentence embeddings."""
    with torch.no_grad():
        return adapter_for(model).job.whole(model, IDS)


def cli(*args) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    if res.exit_code:
        raise RuntimeError(" ".join((res.output or repr(res.exception)).split()).removeprefix("error: "))
    return res.output


class Family:
    """One family's tiny model as a folder and as a GGUF, and its probes."""

    def __init__(self, family: str, root: Path):
        self.family, self.root = family, root
        self.folder = root / "hf"
        model = make_family_model(family)
        self.tokenizer = make_wordpiece_tokenizer() if family in ENCODERS else make_byte_tokenizer(merge=True)
        if family in ENCODERS:
            write_sentence_folder(model, self.tokenizer, self.folder)
        else:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # (transformers gives a Phi-3 GGUF without one
                                                                 # id 32000, past the tiny vocabulary)
            model.save_pretrained(self.folder)
            self.tokenizer.save_pretrained(self.folder)
        self.text = root / "calib.txt"
        self.text.write_text(word_text(600, seed=3))
        self.calib = Calibration(str(self.text), 2)

    def quantize(self, out: Path, **kw) -> "mixq.pipeline.Result":
        config = QuantizeConfig(**{"budget": Budget(bits=4.5), "calibration": self.calib, "eval_windows": 0, **kw})
        return mixq.quantize(str(self.folder), None, config, out=out)

    def whole_flow(self) -> str:
        result = self.quantize(self.root / "q")
        if not torch.equal(logits(mixq.load(self.root / "q")), logits(result.model)):
            raise RuntimeError("the loaded model's logits differ from the packed model's")
        return "✓"

    def command(self, *args) -> str:
        cli(*args)
        return "✓"

    def float_tables(self) -> str:
        self.quantize(self.root / "qt", tables=False)
        return "✓"

    def latency(self) -> str:
        """A latency budget: the cost table measured on the family's model, the allocation made on it (a
        generous 1.5 × the float decode time: tiny models time mostly overhead)."""
        self.quantize(None, budget=Budget(of_float=1.5))
        return "✓"

    def transform(self, name: str) -> str:
        model, _, _ = load_model(str(self.folder))
        want = logits(model)
        apply_transforms(model, (name,), adapter_for(model).job.calibration(model, self.tokenizer, str(self.text), 2))
        err = float((logits(model) - want).abs().max())
        if err > 1e-3:
            raise RuntimeError(f"the float model's logits moved by {err:.2g}")
        self.quantize(self.root / f"q-{name}", transforms=(name,))
        return f"✓ ({err:.0e})"

    def solver(self, name: str) -> str:
        model = make_family_model(self.family)
        spec = QuantSpec.of(4, 32, "min", 6)
        plan = Plan({n: Candidate(spec, Chain.parse(name if SOLVERS[name].starts else f"gptq+{name}"))
                     for n in adapter_for(model).layer_names(model)})
        config = QuantizeConfig(plan=plan, calibration=self.calib, eval_windows=0)
        mixq.quantize(str(self.folder), None, config)
        return "✓"

    def estimator(self, name: str) -> str:
        self.quantize(None, estimator=name)
        return "✓"

    def export_gguf(self, from_gguf: bool) -> str:
        """Quantized among ggml types from a GGUF of the family (mixq.testing writes it; mixq loads it) or from
        the folder, exported to GGUF and read back."""
        source = self.folder
        if from_gguf:
            source = self.root / "float.gguf"
            write_tiny_gguf(make_family_model(self.family), source)
        out, file = self.root / f"qg{int(from_gguf)}", self.root / f"q{int(from_gguf)}.gguf"
        cli("quantize", "--model", source, "--bits", 5, "--out", out, "--compatible", "gguf",
            "--eval-windows", 0, "--calib", self.text, "--calib-windows", 2)
        cli("export", out, "--to", "gguf", file)
        theirs, _, _ = load_model(str(file))
        return self._same(theirs, mixq.load(out))

    def export_compressed(self) -> str:
        cli("quantize", "--model", self.folder, "--bits", 4, "--out", self.root / "qc", "--compatible",
            "compressed-tensors", "--eval-windows", 0, "--calib", self.text, "--calib-windows", 2)
        cli("export", self.root / "qc", "--to", "compressed-tensors", self.root / "ct")
        ours = mixq.load(self.root / "qc")
        theirs = adapter_for(ours).job.model_class.from_pretrained(self.root / "ct", dtype=torch.float32).eval()
        theirs.config.sentence_pooling = getattr(ours.config, "sentence_pooling", None)
        return self._same(theirs, ours)

    @staticmethod
    def _same(theirs, ours) -> str:
        err = float((logits(theirs) - logits(ours)).abs().max())
        if err > 1e-4:
            raise RuntimeError(f"the export's logits differ from the saved model's by {err:.2g}")
        return "✓"


def probe(fn, *args) -> str:
    try:
        return fn(*args)
    except Exception as e:  # the refusal, as the user reads it
        return "✗ " + str(e).splitlines()[0][:160]


def main() -> None:
    torch.set_num_threads(1)
    stages = {
        "quantize → save → load": lambda f: f.whole_flow(),
        "eval": lambda f: f.command("eval", f.root / "q", "--text", f.text, "--windows", 1),
        "generate": lambda f: f.command("generate", f.root / "q", "--prompt", "the model", "--max-new-tokens", 4),
        "report": lambda f: f.command("report", f.root / "q"),
        "--float-tables": lambda f: f.float_tables(),
        "--latency (cost table)": lambda f: f.latency(),
        **{n: (lambda f, n=n: f.transform(n)) for n in TRANSFORMS},
        "GGUF export (from a GGUF)": lambda f: f.export_gguf(True),
        "GGUF export (from a folder)": lambda f: f.export_gguf(False),
        "compressed-tensors export": lambda f: f.export_compressed(),
    }
    rows, solvers, estimators = {}, {}, {}
    t0 = time.perf_counter()
    for family in FAMILIES + ENCODERS:
        with tempfile.TemporaryDirectory() as tmp:
            f = Family(family, Path(tmp))
            rows[family] = {name: probe(fn, f) for name, fn in stages.items()}
            solvers[family] = {n: probe(f.solver, n) for n in SOLVERS}
            estimators[family] = {n: probe(f.estimator, n) for n in ESTIMATORS}
        print(family, json.dumps(rows[family], ensure_ascii=False), flush=True)
    write(rows, solvers, estimators, time.perf_counter() - t0)


def table(title: str, cells: dict[str, dict[str, str]], notes: dict[str, int]) -> list[str]:
    """Families as rows; a refusal becomes ✗ with a numbered note (the same message, the same number)."""
    columns = list(next(iter(cells.values())))
    lines = [f"| {title} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for family, row in cells.items():
        out = []
        for c in columns:
            v = row[c]
            if v.startswith("✗"):
                n = notes.setdefault(v[2:], len(notes) + 1)
                v = f"✗ [{n}]"
            out.append(v)
        lines.append(f"| {family} | " + " | ".join(out) + " |")
    return lines


def widths() -> list[str]:
    """The default candidate formats that fit rows of Gemma's widths (and their MLPs'), and those dropped."""
    from mixq.config import default_specs

    specs = default_specs()
    lines = ["| row width | formats kept | formats dropped (groups do not divide the row) |", "|---|---|---|"]
    for cols in (640, 1152, 2048, 2560, 6912, 10240):
        kept = sorted({f"g{s.group_size}" for s in specs if s.fits(cols)})
        dropped = sorted({f"g{s.group_size}" for s in specs if not s.fits(cols)})
        lines.append(f"| {cols} | {', '.join(kept)} | {', '.join(dropped) or '-'} |")
    return lines


def write(rows, solvers, estimators, seconds: float) -> None:
    notes: dict[str, int] = {}
    lines = ["# What works for each model family", "",
             "Each cell is a run of mixq on the family's tiny random-weight model (`mixq.testing`: 2 blocks, width 64, "
             "from transformers' own config class), produced by `python benchmarks/families.py`: ✓ it ran and passed "
             "its check, ✗ the one-line refusal mixq gives (notes below). Checks: the saved folder loads to the "
             "packed model's very logits; `rotate`/`resq` keep the float logits (largest change in brackets); an "
             "export reads back in transformers to the saved model's logits (GPT-NeoX's GGUF, which transformers "
             "does not read, in mixq's own reader). The GGUF export is tried from a GGUF of the family (the export "
             "keeps its tokenizer and metadata) and from the Hugging Face folder (hyper-parameters from the config "
             "as llama.cpp's convert_hf_to_gguf.py writes them, tokenizer from tokenizer.json).", "",
             provenance() + f" {seconds:.0f} s in all.", ""]
    lines += table("family", rows, notes) + [""]
    lines += ["## Solvers (every layer at 4-bit g32 min; a refiner after gptq)", ""]
    lines += table("family", solvers, notes) + [""]
    lines += ["## Sensitivity estimators (an allocation at 4.5 bpw)", ""]
    lines += table("family", estimators, notes) + [""]
    lines += ["## Rows of Gemma's widths", "",
              "Gemma 3's 270M, 1B and 4B models have rows of 640, 1152 and 2560 weights (MLP rows of 2048, 6912, "
              "10240). A layer keeps the default candidates whose groups divide its rows; where none does, the same "
              "formats with one group per row (profile.layer_costs).", ""] + widths() + [""]
    if notes:
        lines += ["## Refusals", ""] + [f"{n}. {msg}" for msg, n in notes.items()] + [""]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
