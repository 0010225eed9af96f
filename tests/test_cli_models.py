import json

from vitkit.cli.main import main
from vitkit.models.info import model_info


def test_models_table(capsys):
    assert main(["models", "deit_tiny*"]) == 0
    out = capsys.readouterr().out
    assert "deit_tiny_patch16_224" in out and "5.7M" in out and "3x224x224" in out
    # DeiT-Ti at 224: 1.26 GMACs, i.e. about 2.5 GFLOPs.
    assert " 2.5" in out.splitlines()[1]


def test_info_numbers_by_hand():
    info = model_info("vit_base_patch16_224", resolutions=(224, 384))
    r224, r384 = info["resolutions"]
    assert r224["tokens"] == 14 * 14 + 1 and r384["tokens"] == 24 * 24 + 1
    assert abs(r224["gmacs"] - 17.56) < 0.05  # the ViT-B/16 number of the DeiT tables
    assert r224["attn_matrix_mib_fp32_per_layer"] == 12 * 197 * 197 * 4 / 2**20
    D = 768
    per_block = 4 * D * D + 4 * D + 2 * 4 * D * D + 4 * D + D + 2 * 2 * D  # qkv+proj, fc1+fc2, norms
    assert info["params_per_part"]["per block"] == per_block
    assert info["params"] == 86_567_656


def test_info_json_and_errors(capsys):
    assert main(["info", "test_vit", "--json", "--res", "32", "64"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [r["tokens"] for r in info["resolutions"]] == [17, 65]
    assert main(["info", "vit_smal_patch16_224"]) == 2
    assert "did you mean" in capsys.readouterr().err
