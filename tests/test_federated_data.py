"""Federated data splits: Dirichlet(α) label partitions and the text task split by document."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from istfx.errors import ISTError
from istfx.runtime.federated_data import (
    IID,
    ByteWindows,
    Document,
    LabelPartition,
    dirichlet_label_partition,
    document_partition,
    join_documents,
    labels_of,
    leaf_clients,
    parse_alpha,
    pydoc_topics,
    stdlib_sources,
    text_documents,
)

ALPHAS = st.sampled_from([0.05, 0.1, 0.5, 1.0, 10.0, IID])


def balanced_labels(classes: int = 10, per_class: int = 100) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(per_class)


@st.composite
def federations(draw):
    clients = draw(st.integers(1, 20))
    n = draw(st.integers(clients, 300))
    classes = draw(st.integers(1, 10))
    labels = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)))
    return labels, clients, draw(ALPHAS), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None)
@given(federations())
def test_every_sample_lands_on_exactly_one_nonempty_client(case):
    labels, clients, alpha, seed = case
    parts = dirichlet_label_partition(labels, clients, alpha, seed)
    assert len(parts) == clients
    assert all(len(p) >= 1 for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(labels)))
    partition = LabelPartition.of_labels(labels, clients, alpha, seed, classes=10)
    assert torch.equal(partition.histograms.sum(0), torch.bincount(labels, minlength=10))
    assert partition.sizes == [len(p) for p in parts]


@settings(max_examples=40, deadline=None)
@given(federations(), st.integers(1, 5))
def test_min_samples_holds_whenever_there_are_enough(case, min_samples):
    labels, clients, alpha, seed = case
    if len(labels) < clients * min_samples:
        with pytest.raises(ISTError, match="fewer clients"):
            dirichlet_label_partition(labels, clients, alpha, seed, min_samples=min_samples)
        return
    parts = dirichlet_label_partition(labels, clients, alpha, seed, min_samples=min_samples)
    assert min(len(p) for p in parts) >= min_samples
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(labels)))


@settings(max_examples=30, deadline=None)
@given(federations())
def test_same_seed_same_split(case):
    labels, clients, alpha, seed = case
    first = dirichlet_label_partition(labels, clients, alpha, seed)
    again = dirichlet_label_partition(labels, clients, alpha, seed)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_another_seed_another_split():
    labels = balanced_labels()
    for alpha in (0.1, 0.5, IID):
        a = dirichlet_label_partition(labels, 8, alpha, seed=0)
        b = dirichlet_label_partition(labels, 8, alpha, seed=1)
        assert not all(torch.equal(x, y) for x, y in zip(a, b)), alpha


def test_iid_gives_equal_sizes_and_near_uniform_histograms():
    labels = balanced_labels(10, 160)
    partition = LabelPartition.of_labels(labels, 10, "iid", seed=3)
    assert max(partition.sizes) - min(partition.sizes) <= 1
    mixes = partition.histograms.double() / partition.histograms.sum(1, keepdim=True)
    assert (mixes - 0.1).abs().max() < 0.1  # 160 samples per client: no class share off by 10 points
    assert partition.skew() < 0.15
    assert (partition.histograms > 0).all()


def test_small_alpha_skews_and_large_alpha_approaches_iid():
    labels = balanced_labels(10, 200)
    skews = {alpha: sum(LabelPartition.of_labels(labels, 16, alpha, seed).skew() for seed in range(5)) / 5
             for alpha in (0.1, 0.5, 100.0, IID)}
    assert skews[0.1] > 0.55  # each client dominated by a few classes
    assert skews[0.1] > skews[0.5] + 0.1 > skews[100.0] + 0.2
    assert skews[100.0] < 0.15 and skews[IID] < 0.15  # sampling noise only
    held = sum(((LabelPartition.of_labels(labels, 16, 0.1, seed).histograms > 0).sum(1).float().mean()
                for seed in range(5))) / 5
    assert held < 6  # of 10 classes, on average


def test_partition_subsets_a_dataset_and_reports_json_ready():
    x = torch.randn(200, 3)
    y = balanced_labels(4, 50)
    data = TensorDataset(x, y)
    partition = LabelPartition.of(data, 5, 0.5, seed=7)
    for client in range(5):
        sub = partition.subset(data, client)
        assert isinstance(sub, TensorDataset)
        assert torch.equal(sub.tensors[0], x[partition.indices[client]])
        assert torch.equal(torch.bincount(sub.tensors[1], minlength=4), partition.histograms[client])
    summary = partition.summary()
    assert summary["alpha"] == 0.5 and summary["clients"] == 5 and sum(summary["sizes"]) == 200
    assert LabelPartition.of(data, 5, "iid").summary()["alpha"] == "iid"
    with pytest.raises(ISTError, match=r"client must lie in \[0, 5\)"):
        partition.subset(data, 5)


def test_labels_of_reads_any_dataset_of_pairs_and_refuses_float_labels():
    pairs = [(torch.zeros(2), 3), (torch.zeros(2), 1)]
    assert labels_of(pairs).tolist() == [3, 1]
    with pytest.raises(ISTError, match="integer class label"):
        labels_of(TensorDataset(torch.zeros(4, 2), torch.zeros(4)))


def test_bad_arguments_are_refused():
    assert parse_alpha("iid") == parse_alpha("inf") == parse_alpha(None) == IID == math.inf
    assert parse_alpha("0.1") == 0.1
    for bad in ("0", "-1", "nan", "many", 0, True):
        with pytest.raises(ISTError, match="alpha"):
            parse_alpha(bad)
    with pytest.raises(ISTError, match="clients"):
        dirichlet_label_partition([0, 1], 0, 0.5)
    with pytest.raises(ISTError, match="fewer clients"):
        dirichlet_label_partition([0, 1, 2], 4, 0.5)
    with pytest.raises(ISTError, match="integer classes"):
        dirichlet_label_partition(torch.tensor([0.0, 1.0]), 1, 0.5)
    import numpy as np
    assert [p.tolist() for p in dirichlet_label_partition(np.array([1, 0, 1]), 1, None)] == [[0, 1, 2]]
    with pytest.raises(ISTError, match=r"labels must lie in \[0, 2\)"):
        LabelPartition.of_labels([0, 1, 2], 1, 0.5, classes=2)


# -- text, by document -------------------------------------------------------------------------------------------


def docs(sizes):
    return [Document(f"d{i}", bytes([65 + i % 26]) * size) for i, size in enumerate(sizes)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 500), min_size=2, max_size=40), st.integers(1, 8), st.integers(0, 1000),
       st.sampled_from([0.0, 0.1, 0.3]))
def test_documents_go_whole_to_one_client_or_validation(sizes, clients, seed, val_fraction):
    documents = docs(sizes)
    try:
        split = document_partition(documents, clients, seed, val_fraction=val_fraction)
    except ISTError as exc:
        assert "documents cannot give" in str(exc)
        return
    dealt = [d.name for c in split.clients for d in c] + [d.name for d in split.validation]
    assert sorted(dealt) == sorted(d.name for d in documents)
    assert len(split.clients) == clients and all(split.clients)
    held = sum(len(d.text) for d in split.validation)
    if val_fraction:
        assert split.validation and held >= val_fraction * sum(sizes)
        # holding out stops at the first document that reaches the fraction
        assert held - len(split.validation[-1].text) < val_fraction * sum(sizes)
    else:
        assert not split.validation
    loads = [sum(len(d.text) for d in c) for c in split.clients]
    assert max(loads) - min(loads) <= max(sizes)  # least-loaded dealing: within one document
    again = document_partition(documents, clients, seed, val_fraction=val_fraction)
    assert again == split


def test_pydoc_topics_split_per_client_with_byte_windows():
    topics = pydoc_topics()
    assert len(topics) > 30 and all(d.name.startswith("topic:") for d in topics)
    split = document_partition(topics, 16, seed=0)
    summary = split.summary()
    assert summary["clients"] == 16 and len(summary["validation_documents"]) >= 1
    assert sum(summary["bytes"]) + summary["validation_bytes"] == sum(len(d.text) for d in topics)
    tokens = split.client_bytes(3)
    assert tokens.dtype == torch.int64 and int(tokens.max()) < 256
    assert bytes(tokens.tolist()) == b"\n\n".join(d.text for d in split.clients[3])
    windows = ByteWindows(tokens, block_size=32)
    assert len(windows) == (len(tokens) - 33) // 32 + 1
    x, y = windows[len(windows) - 1]
    assert x.shape == y.shape == (32,) and torch.equal(x[1:], y[:-1])
    assert torch.equal(windows[-1][0], x)
    with pytest.raises(IndexError):
        windows[len(windows)]
    assert document_partition(topics, 16, seed=1).summary()["documents"] != summary["documents"]


def test_byte_windows_stride_and_refusals():
    tokens = torch.arange(10)
    windows = ByteWindows(tokens, block_size=4, stride=2)
    assert [windows[i][0].tolist() for i in range(len(windows))] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]
    assert windows[2][1].tolist() == [5, 6, 7, 8]
    with pytest.raises(ISTError, match="one window"):
        ByteWindows(torch.arange(4), block_size=4)
    assert join_documents([]).numel() == 0


def test_stdlib_sources_read_a_folder_of_python_files(tmp_path):
    (tmp_path / "b.py").write_text("x = 2\n")
    (tmp_path / "a.py").write_text("print('a')\n")
    (tmp_path / "notes.txt").write_text("not python")
    found = stdlib_sources(tmp_path)
    assert [d.name for d in found] == ["stdlib:a.py", "stdlib:b.py"]
    assert found[1].text == b"x = 2\n"
    with pytest.raises(ISTError, match="no \\*.py files"):
        stdlib_sources(tmp_path / "missing")
    assert len(text_documents("stdlib")) > 50
    with pytest.raises(ISTError, match="unknown text corpus"):
        text_documents("web")


def test_document_partition_refuses_what_it_cannot_split():
    with pytest.raises(ISTError, match="3 training documents cannot give 4 clients"):
        document_partition(docs([5, 5, 5]), 4, val_fraction=0.0)
    with pytest.raises(ISTError, match="distinct names"):
        document_partition([Document("a", b"x"), Document("a", b"y")], 1)
    with pytest.raises(ISTError, match="val_fraction"):
        document_partition(docs([5, 5]), 1, val_fraction=1.0)


# -- LEAF files ----------------------------------------------------------------------------------------------------


def test_leaf_femnist_and_shakespeare_files_give_one_dataset_per_user(tmp_path):
    import json

    femnist = {"users": ["f0001_02", "f0002_07"], "num_samples": [2, 1], "hierarchies": [],
               "user_data": {"f0001_02": {"x": [[0.0] * 784, [1.0] * 784], "y": [3, 41]},
                             "f0002_07": {"x": [[0.5] * 784], "y": [9]}}}
    folder = tmp_path / "femnist"
    folder.mkdir()
    (folder / "all_data_1.json").write_text(json.dumps(femnist))
    (folder / "all_data_0.json").write_text(json.dumps({"users": ["f0000_01"], "num_samples": [1],
                                                        "user_data": {"f0000_01": {"x": [[0.25] * 784],
                                                                                   "y": [0]}}}))
    users = leaf_clients(folder)
    assert [u for u, _ in users] == ["f0000_01", "f0001_02", "f0002_07"]  # files in name order
    x, y = users[1][1].tensors
    assert x.shape == (2, 784) and x.dtype == torch.float32 and y.tolist() == [3, 41]

    shakespeare = {"users": ["THE_TEMPEST_MIRANDA"], "num_samples": [2],
                   "user_data": {"THE_TEMPEST_MIRANDA": {"x": ["O, I have suff", "ered\nWith thos"],
                                                         "y": ["e", "e"]}}}
    file = tmp_path / "shakespeare.json"
    file.write_text(json.dumps(shakespeare))
    [(user, data)] = leaf_clients(file)
    x, y = data.tensors
    assert user == "THE_TEMPEST_MIRANDA" and x.dtype == torch.int64 and x.shape == (2, 14)
    assert bytes(x[1].tolist()) == b"ered\nWith thos" and y.tolist() == [ord("e")] * 2


def test_leaf_refuses_files_that_are_not_leaf(tmp_path):
    import json

    with pytest.raises(ISTError, match="no LEAF JSON files"):
        leaf_clients(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"users": ["a"]}))
    with pytest.raises(ISTError, match="not a LEAF file"):
        leaf_clients(bad)
    bad.write_text(json.dumps({"users": ["a"], "num_samples": [2], "user_data": {"a": {"x": [[1.0]], "y": [0]}}}))
    with pytest.raises(ISTError, match="num_samples 2"):
        leaf_clients(bad)
    bad.write_text(json.dumps({"users": ["a"], "num_samples": [1], "user_data": {"a": {"x": ["\u20ac"], "y": ["e"]}}}))
    with pytest.raises(ISTError, match="beyond one byte"):
        leaf_clients(bad)


# -- the benchmark's model files ---------------------------------------------------------------------------------


def test_text_model_file_gives_each_client_its_own_whole_topics():
    from pathlib import Path

    from istfx.cli.loader import load_model_file

    root = Path(__file__).resolve().parent.parent
    loaded = load_model_file(root / "examples/models/gpt_text_clients.py")
    split = document_partition(pydoc_topics(), 16, seed=0)
    client = loaded.module.client_data(5, 16)
    assert torch.equal(client.tokens, split.client_bytes(5))
    x, y = client[0]
    assert x.shape == (64,) and torch.equal(x[1:], y[:-1])
    held = {d.name for d in split.validation}
    assert held and not held & {d.name for d in split.clients[5]}
    assert torch.equal(loaded.module.eval_data().tokens, split.validation_bytes())
    logits = loaded.model(x[None])
    assert logits.shape == (1, 64, 256)


def test_cnn_model_file_reads_digit_images():
    from pathlib import Path

    from istfx.cli.loader import load_model_file

    loaded = load_model_file(Path(__file__).resolve().parent.parent / "examples/models/cnn_digits.py")
    x, y = loaded.module.train_data().tensors
    assert x.shape[1:] == (1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert loaded.model(x[:4]).shape == (4, 10)
    assert len(loaded.module.eval_data()) + len(y) == 1797
