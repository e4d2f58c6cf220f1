"""Query types (recommend, search by image, search by text) and their CLI, on real embeddings."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from PIL import Image

from vrec_utils.cli import main
from vrec_utils.images import ImageLoadError
from vrec_utils.index import build_index, create_index
from vrec_utils.models import TextNotSupportedError
from vrec_utils.search import recommend, search_by_image, search_by_text
from vrec_utils.store import EmbeddingsNotFoundError

MODEL = "efficientnet-lite0"
N_ITEMS = 300


@pytest.fixture(scope="module")
def embedder():
    from vrec_utils.models import create_embedder

    return create_embedder(MODEL, device="cpu")


@pytest.fixture(scope="module")
def index(real):
    catalog, workdir, _ = real
    return build_index(workdir, catalog, MODEL)


@pytest.fixture(scope="module")
def cli_catalog(fashion_small_dir):
    """The CLI gets the whole fashion-small folder; only the items whose image content is cached
    (the 300 and their byte-identical copies) are indexed, so the commands need --allow-partial."""
    return fashion_small_dir


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------- recommend


def test_recommend_returns_k_similar_items_without_the_item(real, index):
    catalog, workdir, embeddings = real
    item = str(embeddings.ids[0])
    frame = recommend(catalog, workdir, MODEL, item, k=5, index=index)
    assert list(frame.columns[:4]) == ["query_id", "rank", "item_id", "score"]
    assert frame["rank"].tolist() == [1, 2, 3, 4, 5]
    assert item not in frame["item_id"].tolist()
    assert frame["score"].is_monotonic_decreasing
    # the same as a direct index search
    expected = index.search(embeddings.vectors_for([item]), 6).ids[0]
    assert frame["item_id"].tolist() == [i for i in expected if i != item][:5]
    assert frame["title"].tolist() == catalog.items.loc[frame["item_id"], "title"].tolist()


def test_recommend_same_category_keeps_the_query_items_category(real, index):
    catalog, workdir, _ = real
    counts = catalog.items["articleType"].value_counts()
    items = [catalog.items.index[catalog.items["articleType"] == t][0] for t in counts.index[:3]]
    frame = recommend(catalog, workdir, MODEL, items, k=5, same_category="articleType", index=index)
    assert sorted(frame["query_id"].unique()) == sorted(items)  # every query answered: no empty pass
    for item, group in frame.groupby("query_id"):
        assert (group["articleType"] == catalog.items.at[item, "articleType"]).all()
        assert len(group) == 5 and item not in group["item_id"].tolist()


def test_recommend_builds_and_reuses_the_saved_index(real):
    catalog, workdir, embeddings = real
    frame = recommend(catalog, workdir, MODEL, [str(embeddings.ids[1]), str(embeddings.ids[2])], k=3)
    assert frame.groupby("query_id").size().to_dict() == {str(embeddings.ids[1]): 3, str(embeddings.ids[2]): 3}


def test_recommend_bad_input(real, index):
    catalog, workdir, _ = real
    item = catalog.ids[0]
    with pytest.raises(KeyError, match="item id 'no-such-id' is not in catalog"):
        recommend(catalog, workdir, MODEL, "no-such-id", index=index)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        recommend(catalog, workdir, MODEL, item, k=0, index=index)
    with pytest.raises(ValueError, match="column 'colour' is not in catalog"):
        recommend(catalog, workdir, MODEL, item, same_category="colour", index=index)
    with pytest.raises(EmbeddingsNotFoundError, match="make them with: vrec extract .*--model resnet50"):
        recommend(catalog, workdir, "resnet50", item)
    with pytest.raises(ValueError, match="holds 'efficientnet-lite0' vectors, not 'resnet50'"):
        search_by_image(catalog, workdir, "resnet50", catalog.image_path(item), index=index)


# ---------------------------------------------------------------------------------------- search by image


def test_search_by_image_finds_the_catalog_image_first(real, index, embedder, tmp_path):
    catalog, workdir, embeddings = real
    item = str(embeddings.ids[10])
    source = catalog.image_path(item)
    copy = tmp_path / "query.png"  # an image file that is not in the catalog
    Image.open(source).convert("RGB").save(copy)
    frame = search_by_image(catalog, workdir, MODEL, copy, k=10, embedder=embedder, index=index)
    assert len(frame) == 10 and frame["query_image"].unique().tolist() == [str(copy)]
    assert frame["item_id"].iloc[0] == item or frame["score"].iloc[0] == pytest.approx(frame["score"].iloc[1], abs=1e-4)
    assert frame["score"].iloc[0] > 0.99
    # PIL images, several at once, and a filter
    pictures = [Image.open(catalog.image_path(i)) for i in embeddings.ids[:2]]
    frame = search_by_image(catalog, workdir, MODEL, pictures, k=3, embedder=embedder, index=index, filters={"gender": "Men"})
    assert frame["query"].tolist() == [0, 0, 0, 1, 1, 1]
    assert (frame["gender"] == "Men").all()


def test_search_by_image_that_cannot_be_read(real, index, embedder, tmp_path):
    catalog, workdir, _ = real
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageLoadError, match="cannot read query image .*broken.jpg.*: not an image file"):
        search_by_image(catalog, workdir, MODEL, broken, embedder=embedder, index=index)
    with pytest.raises(ImageLoadError, match="file not found"):
        search_by_image(catalog, workdir, MODEL, tmp_path / "missing.jpg", embedder=embedder, index=index)


def test_dimension_mismatch_between_index_and_model(real, embedder):
    catalog, workdir, embeddings = real
    wrong = create_index("faiss", model=MODEL, dim=64)  # e.g. an index made with other settings
    wrong.add(["a"], np.ones((1, 64), np.float32))
    with pytest.raises(ValueError, match="dimension mismatch: the index holds 64-d vectors .* query vectors are 1280-d"):
        search_by_image(catalog, workdir, MODEL, catalog.image_path(embeddings.ids[0]), embedder=embedder, index=wrong)


def test_query_embedder_with_other_weights_is_refused(real, index):
    from vrec_utils.models import create_embedder

    catalog, workdir, embeddings = real
    random_weights = create_embedder(MODEL, weights="random", device="cpu")
    with pytest.raises(ValueError, match="weights .* differ from those of the cached"):
        search_by_image(catalog, workdir, MODEL, catalog.image_path(embeddings.ids[0]), embedder=random_weights, index=index)


# ---------------------------------------------------------------------------------------- search by text


def test_text_search_with_an_image_only_model_is_a_clear_error(real, index):
    catalog, workdir, _ = real
    with pytest.raises(TextNotSupportedError, match="image-only"):
        search_by_text(catalog, workdir, MODEL, "red summer dress", index=index)


def test_text_search_with_a_vision_language_model(real, tmp_path_factory):
    from vrec_utils.extract import extract_image_embeddings
    from vrec_utils.models import create_embedder

    catalog, _, _ = real
    small = catalog.head(40)
    workdir = tmp_path_factory.mktemp("mini-siglip")
    embedder = create_embedder("mini-siglip", device="cpu")
    extract_image_embeddings(small, embedder, workdir, precision="fp32", num_workers=0, progress=False)
    frame = search_by_text(small, workdir, "mini-siglip", ["red summer dress", "black shoes"], k=4, embedder=embedder)
    assert frame.groupby("query_text").size().to_dict() == {"red summer dress": 4, "black shoes": 4}
    assert frame["item_id"].isin(small.ids).all()
    with pytest.raises(ValueError, match="must not be empty"):
        search_by_text(small, workdir, "mini-siglip", [" "], embedder=embedder)


# ---------------------------------------------------------------------------------------- CLI


def test_cli_index_then_recommend_json(real, cli_catalog, capsys):
    _, workdir, embeddings = real
    code, out, err = _cli(capsys, "index", "--catalog", cli_catalog, "--workdir", workdir, "--model", MODEL, "--allow-partial", "--json")
    assert code == 0, err
    summary = json.loads(out)
    # byte-identical copies of the cached images elsewhere in fashion-small share their vectors
    assert summary["backend"] == "faiss" and N_ITEMS <= summary["size"] < N_ITEMS + 20 and summary["dim"] == 1280
    item = str(embeddings.ids[3])
    code, out, err = _cli(capsys, "recommend", "--catalog", cli_catalog, "--workdir", workdir, "--model", MODEL, "--allow-partial", "--item", item, "-k", 4, "--same-category", "articleType", "--json")
    assert code == 0, err
    records = json.loads(out)
    assert [r["rank"] for r in records] == [1, 2, 3, 4]
    assert all(r["query_id"] == item and r["item_id"] != item for r in records)
    assert {r["articleType"] for r in records} == {real[0].items.at[item, "articleType"]}


def test_cli_index_with_hnsw_settings(real, cli_catalog, capsys):
    _, workdir, _ = real
    code, out, err = _cli(capsys, "index", "--catalog", cli_catalog, "--workdir", workdir, "--model", MODEL, "--allow-partial", "--ann", "hnsw", "--ef-search", 64, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["ann"], summary["ef_search"]) == ("hnsw", 64)


def test_cli_index_exact_method_is_a_search_setting_of_the_saved_index(real, cli_catalog, capsys, monkeypatch):
    """--exact-method is reported by `index` and really chooses the path of `recommend`'s search."""
    from vrec_utils.index import exact

    _, workdir, embeddings = real
    bf16_calls = []
    real_bf16 = exact.bf16_rescored_knn
    monkeypatch.setattr(exact, "bf16_rescored_knn", lambda *a, **kw: bf16_calls.append(1) or real_bf16(*a, **kw))
    answers = {}
    for method in ("fp32", "bf16-rescored"):  # the same saved index, reloaded with each
        code, out, err = _cli(capsys, "index", "--catalog", cli_catalog, "--workdir", workdir, "--model", MODEL, "--allow-partial", "--exact-method", method, "--json")
        assert code == 0, err
        assert json.loads(out)["exact_method"] == method
        bf16_calls.clear()
        code, out, err = _cli(capsys, "recommend", "--catalog", cli_catalog, "--workdir", workdir, "--model", MODEL, "--allow-partial",
                              "--exact-method", method, "--item", str(embeddings.ids[0]), "-k", 5, "--json")  # fmt: skip
        assert code == 0, err
        assert bool(bf16_calls) == (method == "bf16-rescored"), method
        answers[method] = [r["item_id"] for r in json.loads(out)]
    assert answers["fp32"] == answers["bf16-rescored"]  # the same answer either way (the tie rule)


def test_cli_search_by_image_json(real, cli_catalog, capsys):
    catalog, workdir, embeddings = real
    image = catalog.image_path(embeddings.ids[5])
    code, out, err = _cli(capsys, "search", "--catalog", cli_catalog, "--workdir", workdir, "--model", MODEL, "--allow-partial", "--device", "cpu", "--image", image, "-k", 3, "--json")
    assert code == 0, err
    records = json.loads(out)
    assert len(records) == 3 and records[0]["query_image"] == str(image)
    assert records[0]["score"] > 0.99


@pytest.mark.parametrize(
    "argv, message",
    [
        (["recommend", "--item", "no-such-id"], "item id 'no-such-id' is not in catalog"),
        (["recommend", "--item", "{item}", "-k", "0"], "argument -k: must be at least 1"),
        (["recommend", "--item", "{item}", "--model-override", "resnet50"], "vrec extract"),
        (["search", "--text", "red summer dress"], "image-only"),
        (["search", "--image", "{missing}"], "cannot read query image"),
        (["recommend", "--item", "{item}", "--backend", "elasticsearch", "--ann", "hnsw"], "--ann: not a setting of the elasticsearch backend"),
        (["search", "--image", "{image}", "--filter", "gender"], "--filter takes COLUMN=VALUE"),
    ],
)
def test_cli_errors_are_one_line_exit_2(real, cli_catalog, capsys, tmp_path, argv, message):
    catalog, workdir, embeddings = real
    item = str(embeddings.ids[0])
    model = MODEL
    argv = [a.format(item=item, missing=tmp_path / "missing.jpg", image=catalog.image_path(item)) for a in argv]
    if "--model-override" in argv:
        model = argv[argv.index("--model-override") + 1]
        argv = argv[: argv.index("--model-override")]
    code, out, err = _cli(capsys, *argv, "--catalog", cli_catalog, "--workdir", workdir, "--model", model)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_unreachable_elasticsearch_names_the_fix(real, cli_catalog, capsys, monkeypatch):
    _, workdir, embeddings = real
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("VREC_ES_URL", f"http://127.0.0.1:{port}")
    code, out, err = _cli(capsys, "recommend", "--catalog", cli_catalog, "--workdir", workdir, "--model", MODEL, "--allow-partial", "--item", str(embeddings.ids[0]), "--backend", "elasticsearch")
    assert code == 2
    assert f"cannot reach Elasticsearch at http://127.0.0.1:{port}" in err
    assert "VREC_ES_URL" in err and "docker compose up -d elasticsearch" in err
