import pytest

from vitkit.config import auto_recipe, list_recipes, load_config


@pytest.mark.parametrize("name", list_recipes())
def test_every_packaged_recipe_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.engine.epochs >= 1 and cfg.data.batch_size >= 1
    if cfg.model.name:
        import vitkit

        vitkit.get_model_card(cfg.model.name)  # raises for an unknown model


def test_auto_recipe_only_for_shapes():
    assert auto_recipe([]) == "shapes_quick"
    assert auto_recipe(["data.path=shapes:500"]) == "shapes_quick"
    assert auto_recipe(["data.path=/data/pets"]) is None
    cfg = load_config(None, ["data.path=/data/pets"])
    assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.mixup == 0.8  # the DeiT defaults


def test_overrides_beat_recipe_and_unknown_keys_are_named():
    cfg = load_config("shapes_quick", ["engine.epochs=2", "optim.lr=1e-3"])
    assert cfg.engine.epochs == 2 and cfg.optim.lr == 1e-3
    with pytest.raises(ValueError, match="unknown config key 'data.batchsize'"):
        load_config(None, ["data.batchsize=3"])
    with pytest.raises(ValueError, match="engine.epochs"):
        load_config(None, ["engine.epochs=many"])
    with pytest.raises(FileNotFoundError, match="no recipe 'nope'"):
        load_config("nope")
