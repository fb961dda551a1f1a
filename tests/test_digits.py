import pytest
import torch

from torchgraft.data import build_data, list_datasets
from torchgraft.data.loader import DictTensorDataset, StatefulLoader, StatefulSampler
from torchgraft.errors import ConfigError


def test_digits_shapes_normalisation_and_split():
    b = build_data({"name": "digits"})
    x, y = b.train.tensors["inputs"], b.train.tensors["labels"]
    assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.float32
    assert len(b.train) + len(b.val) == 1797
    assert abs(len(b.val) / 1797 - 0.2) < 0.01
    allx = torch.cat([x, b.val.tensors["inputs"]])
    assert abs(allx.mean().item()) < 1e-4 and abs(allx.std().item() - 1) < 1e-3
    assert allx[:, :, :2].abs().sub(allx[0, 0, 0, 0].abs()).abs().max() < 1e-6  # zero padding border
    assert b.info["num_classes"] == 10 and set(y.tolist()) == set(range(10))
    # no image is in both splits
    tr = {tuple(r.flatten().tolist()[::7]) for r in x}
    assert not any(tuple(r.flatten().tolist()[::7]) in tr for r in b.val.tensors["inputs"][:50])


def test_fast_csv_reader_matches_sklearn_load_digits():
    from sklearn.datasets import load_digits

    from torchgraft.data.digits import load_digits_arrays

    images, target = load_digits_arrays()
    d = load_digits()
    assert (images == d.images).all() and (target == d.target).all()


def test_digits_split_is_fixed_and_independent_of_run_seed():
    a = build_data({"name": "digits"}, seed=1)
    b = build_data({"name": "digits"}, seed=2)
    assert torch.equal(a.val.tensors["inputs"], b.val.tensors["inputs"])
    c = build_data({"name": "digits", "split_seed": 5})
    assert not torch.equal(a.val.tensors["labels"], c.val.tensors["labels"])


def test_label_subset_is_remapped_and_val_matches_full_split():
    full = build_data({"name": "digits"})
    sub = build_data({"name": "digits", "labels": [5, 6, 7, 8, 9]})
    assert sub.info["num_classes"] == 5
    assert sorted(set(sub.train.tensors["labels"].tolist())) == [0, 1, 2, 3, 4]
    # the subset's validation images are exactly the full split's images of digits 5-9
    mask = full.val.tensors["labels"] >= 5
    assert torch.equal(sub.val.tensors["inputs"], full.val.tensors["inputs"][mask])
    assert torch.equal(sub.val.tensors["labels"], full.val.tensors["labels"][mask] - 5)


def test_per_class_subset():
    b = build_data({"name": "digits", "labels": [3, 1], "per_class": 10})
    assert len(b.train) == 20
    assert b.train.tensors["labels"].bincount().tolist() == [10, 10]
    with pytest.raises(ConfigError, match="per_class"):
        build_data({"name": "digits", "per_class": 10_000})


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="labels"):
        build_data({"name": "digits", "labels": [1, 11]})
    with pytest.raises(ConfigError, match="unknown config key 'data.label'"):
        build_data({"name": "digits", "label": [1]})
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        build_data({"name": "digit"})
    assert {"digits", "text"} <= set(list_datasets())  # character-level text: "text", tokenizer char


def test_sampler_epochs_are_permutations_and_state_is_o1():
    s = StatefulSampler(10, 3, seed=4)
    assert s.batches_per_epoch == 3
    epoch0 = torch.cat([s.next_indices() for _ in range(3)])
    assert len(set(epoch0.tolist())) == 9
    first_of_epoch1 = s.next_indices()
    state = s.state_dict()
    assert state["epoch"] == 1 and state["index"] == 1
    rest = [s.next_indices() for _ in range(4)]
    s2 = StatefulSampler(10, 3, seed=4)
    s2.load_state_dict(state)  # jumps straight there
    assert all(torch.equal(a, s2.next_indices()) for a in rest)
    assert not torch.equal(first_of_epoch1, epoch0[:3])  # a new order each epoch


def test_sampler_shards_by_rank_and_rejects_mismatched_state():
    a = StatefulSampler(20, 5, seed=0, rank=0, world_size=2)
    b = StatefulSampler(20, 5, seed=0, rank=1, world_size=2)
    ia, ib = torch.cat([a.next_indices(), a.next_indices()]), torch.cat([b.next_indices(), b.next_indices()])
    assert sorted(ia.tolist() + ib.tolist()) == list(range(20))
    with pytest.raises(Exception, match="batch_size"):
        StatefulSampler(20, 4).load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match="larger than the training set"):
        StatefulSampler(3, 4)


def test_loader_fast_path_equals_collate_path():
    ds = DictTensorDataset(inputs=torch.arange(12.).view(6, 2), labels=torch.arange(6))
    fast = StatefulLoader(ds, StatefulSampler(6, 2, seed=1))
    slow = StatefulLoader(ds, StatefulSampler(6, 2, seed=1), collate_fn=torch.utils.data.default_collate)
    for _ in range(4):
        a, b = next(fast), next(slow)
        assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["labels"], b["labels"])
