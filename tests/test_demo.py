"""The Quick start demo end to end on the tiny model, and how it decodes."""
from __future__ import annotations

import json

from percontrast import generation
from percontrast.commands import demo


def test_demo_decodes_with_the_studys_ngram_ban(tmp_path, monkeypatch):
    """The demo's generations use the 3-gram ban the study decodes with: after training, plain greedy
    decoding of the 135M model looped ("Cheers, Maria, ... Cheers, Maria"). Every other output is
    written too."""
    seen = []
    real = generation.generate_records

    def spy(model, tok, records, builder, options, **kw):
        seen.append(options)
        return real(model, tok, records, builder, options, **kw)

    monkeypatch.setattr(generation, "generate_records", spy)
    out = tmp_path / "demo"
    demo.run(demo.DemoConfig(model="tiny-random", output_dir=str(out), epochs=0.2, batch_size=4))
    assert len(seen) == 2                                    # before and after training
    assert all(o.no_repeat_ngram_size == 3 and not o.do_sample for o in seen)
    result = json.loads((out / "demo.json").read_text())
    assert result["train_steps"] >= 1 and "rougeL" in result["after"]
    for name in ("heatmap_before.html", "heatmap_after.html", "model/report.html"):
        assert (out / name).stat().st_size > 0
