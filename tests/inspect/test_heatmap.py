"""Heat-map PNGs (one panel per head, or one for a chosen head), the self-contained HTML view (escaped, no external
resources, the data it carries equal to the captured patterns), and `pocketlm attention` end to end."""
from __future__ import annotations

import json
import re

import matplotlib.image
import pytest
import torch
from conftest import make_teacher
from inspect_helpers import save, tiny_student
from typer.testing import CliRunner

from pocketlm.cli import app
from pocketlm.inspect.attention import AttentionMaps, capture_attention
from pocketlm.inspect.heatmap import layer_figure, panels, render_html, write_heatmaps

EVIL = "<script>alert(1)</script>"


def maps_with(tokens: list[str], layers: int = 2, heads: int = 4, head_ids=None) -> AttentionMaps:
    s = len(tokens)
    torch.manual_seed(0)
    raw = torch.randn(layers, heads, s, s).masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
    patterns = list(raw.softmax(-1))
    return AttentionMaps(spec="toy $model$", token_ids=list(range(s)), tokens=tokens, patterns=patterns,
                         head_ids=head_ids or [list(range(heads))] * layers)


@pytest.mark.parametrize("heads", [1, 3, 4, 9])
def test_layer_figure_has_one_panel_per_head(heads):
    fig = layer_figure(maps_with(["a", "b", "c"], heads=heads).patterns[0], ["a", "$", ""], title="t")
    assert panels(fig) == heads


def test_write_heatmaps_files_and_panels(tmp_path):
    maps = maps_with(["The", " cat", " sat", " $5"], layers=3, heads=4, head_ids=[[0, 1, 2, 3], [2, 3, 6, 7], [0, 1, 2, 3]])
    paths = write_heatmaps(maps, tmp_path, prefix="student_")
    assert [p.name for p in paths] == ["student_layer0.png", "student_layer1.png", "student_layer2.png"]
    image = matplotlib.image.imread(paths[0])
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    one = write_heatmaps(maps, tmp_path, layer=1, head=6)
    assert [p.name for p in one] == ["layer1_head6.png"]
    assert one[0].stat().st_size < paths[1].stat().st_size  # one panel, not four
    with pytest.raises(ValueError, match=r"layer 1 has heads \[2, 3, 6, 7\]; --head 1 is not one"):
        write_heatmaps(maps, tmp_path, layer=1, head=1)
    with pytest.raises(ValueError, match="layers 0..2; --layer 3"):
        write_heatmaps(maps, tmp_path, layer=3)
    with pytest.raises(ValueError, match="--head needs --layer"):
        write_heatmaps(maps, tmp_path, head=0)


def test_html_escapes_tokens_and_loads_nothing_external():
    html = render_html([("student", maps_with(["Hi", EVIL, " & 'x'"])), ("teacher", maps_with(["Hi", EVIL, "!"]))],
                       text=f"Hi {EVIL}")
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r"""(src|href)\s*=|https?://|@import|url\(""", html)
    assert html.count('<section class="view"') == 2
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts == ['<script type="application/json" class="data">'] * 2 + ["<script>"]


def test_html_carries_the_captured_patterns(tokenizer):
    maps = capture_attention(make_teacher(len(tokenizer)), tokenizer, "The cat sat on the mat.", spec="tiny")
    html = render_html([("teacher", maps)], text="The cat sat on the mat.")
    blob = re.search(r'<script type="application/json" class="data">(.*?)</script>', html, re.S).group(1)
    data = json.loads(blob)
    assert data["tokens"] == maps.tokens and data["head_ids"] == maps.head_ids
    got = torch.tensor(data["patterns"])  # [layers, heads, s, s]
    torch.testing.assert_close(got, torch.stack(maps.patterns), atol=5e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(data["entropy"]), torch.stack(maps.entropy()), atol=1e-6, rtol=0)


def test_attention_command_student_beside_teacher(tmp_path, tokenizer, teacher_dir):
    student = save(tiny_student(len(tokenizer)), tokenizer, tmp_path / "student")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["attention", "--model", str(student), "--baseline", str(teacher_dir),
                                      "--text", "The cat sat on the mat.", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "attention_entropy" in result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([".pocketlm.json", ".pocketlm.lock", "attention.html", "results.json"] + [f"model_layer{i}.png" for i in range(2)]
                           + [f"baseline_layer{i}.png" for i in range(4)])
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "attention" and res["baseline"]["spec"] == str(teacher_dir)
    entropy = res["details"]["model"]["entropy"]
    assert len(entropy) == 2 and len(entropy[0]) == 4
    assert all(0 <= e <= torch.log(torch.tensor(7.0)) for layer in entropy for e in layer)
    html = (out / "attention.html").read_text()
    assert html.count('<section class="view"') == 2

    one = CliRunner().invoke(app, ["attention", "--model", str(student), "--text", "The cat", "--out",
                                   str(tmp_path / "one"), "--layer", "1", "--head", "3"])
    assert one.exit_code == 0, one.output
    assert sorted(p.name for p in (tmp_path / "one").glob("*.png")) == ["model_layer1_head3.png"]


def test_attention_command_errors_are_one_line(tmp_path, tokenizer):
    student = save(tiny_student(len(tokenizer)), tokenizer, tmp_path / "student")
    bad = CliRunner().invoke(app, ["attention", "--model", str(student), "--text", "The cat", "--out",
                                   str(tmp_path / "o"), "--layer", "5"])
    assert bad.exit_code == 2 and "has layers 0..1; --layer 5" in bad.output
    empty = CliRunner().invoke(app, ["attention", "--model", str(student), "--text", " ", "--out",
                                     str(tmp_path / "o")])
    assert empty.exit_code == 2 and "--text is empty" in empty.output
