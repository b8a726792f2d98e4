"""bn_course.data: the digits split is deterministic, standardized with training statistics only; labels are checked."""

import pytest
import torch

from bn_course.data import batches, check_class_labels, load_digits_split


def test_shapes_and_dtypes():
    d = load_digits_split()
    assert d.x_train.shape == (1347, 64) and d.x_test.shape == (450, 64)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert set(d.y_train.tolist()) == set(range(10)) == set(d.y_test.tolist())


def test_standardized_with_training_statistics():
    d = load_digits_split()
    varying = d.std != 1  # constant pixels are only centered
    assert torch.allclose(d.x_train.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(d.x_train[:, varying].std(0, unbiased=False), torch.ones(int(varying.sum())), atol=1e-4)
    assert d.x_test.mean(0).abs().max() > 1e-3  # the test set was not standardized with its own mean


def test_deterministic_and_seed_dependent():
    a, b, c = load_digits_split(seed=3), load_digits_split(seed=3), load_digits_split(seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


def test_n_train_subset_is_stratified():
    d = load_digits_split(n_train=200)
    assert d.x_train.shape == (200, 64) and d.x_test.shape == (450, 64)
    assert torch.bincount(d.y_train, minlength=10).min() >= 18


def test_batches_are_seeded_and_full():
    d = load_digits_split()
    s1, s2, s3 = (batches(d.x_train, d.y_train, 60, seed=s) for s in (0, 0, 1))
    for _ in range(30):  # more than one epoch
        (x1, y1), (x2, y2), (x3, _) = next(s1), next(s2), next(s3)
        assert x1.shape == (60, 64) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_one_epoch_visits_each_example_once():
    d = load_digits_split(n_train=100)
    stream = batches(d.x_train, torch.arange(100), 10, seed=0)
    seen = torch.cat([next(stream)[1] for _ in range(10)])
    assert sorted(seen.tolist()) == list(range(100))


@pytest.mark.parametrize("kwargs, match", [
    ({"test_fraction": 1.5}, "test_fraction"),
    ({"n_train": 5}, "n_train"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits_split(**kwargs)


def test_bad_batch_input():
    d = load_digits_split()
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(d.x_train, d.y_train, 0))
    with pytest.raises(ValueError, match="same number of rows"):
        next(batches(d.x_train, d.y_test, 10))


def test_check_class_labels_names_each_mistake():
    y = torch.tensor([0, 3, 9])
    check_class_labels(y, 10, n=3)  # fine: no error
    with pytest.raises(TypeError, match=r"1-D int64 tensor of class labels.*got list"):
        check_class_labels([0, 3, 9], 10)
    with pytest.raises(TypeError, match=r"got dtype torch.float32 of shape \(3,\).*y.long\(\)"):
        check_class_labels(y.float(), 10)
    with pytest.raises(TypeError, match=r"of shape \(3, 1\)"):
        check_class_labels(y[:, None], 10)
    with pytest.raises(ValueError, match="y must hold 4 class labels"):
        check_class_labels(y, 10, n=4)
    with pytest.raises(ValueError, match=r"labels must lie in 0..2 \(n_classes=3\), got values from 0 to 9"):
        check_class_labels(y, 3)
    with pytest.raises(ValueError, match=r"0..9 \(the read-out has 10 outputs\), got values from -1 to 3"):
        check_class_labels(torch.tensor([-1, 3]), 10, outputs="the read-out")
    with pytest.raises(ValueError, match="labels must be >= 0, got values from -1 to 3"):
        check_class_labels(torch.tensor([-1, 3]))
    check_class_labels(torch.zeros(0, dtype=torch.int64), 10)  # an empty batch of labels is well formed


def test_batches_rejects_what_is_not_a_tensor_of_labels():
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        next(batches([[1.0, 2.0]] * 8, y, 4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        next(batches(None, y, 4))
    with pytest.raises(TypeError, match="y must be a 1-D int64 tensor of class labels"):
        next(batches(x, y.tolist(), 4))
    with pytest.raises(TypeError, match="y must be a 1-D int64 tensor of class labels"):
        next(batches(x, y.float(), 4))
