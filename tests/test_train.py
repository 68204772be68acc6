"""The tiny-add training script trains: a few optax steps lower the loss."""
import numpy as np

from jaxpar.train.add import heldout_problems, make_batch, train


def test_loss_falls():
    _, _, losses = train(steps=40, batch=32, log_every=0)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_heldout_problems_never_trained_on():
    held = set(heldout_problems())
    assert len(heldout_problems()) == 1000
    tokens, mask = make_batch(np.random.RandomState(0), 2000, held)
    for row in tokens:
        text = bytes(int(t) for t in row if t < 256).decode()
        a, rest = text.split("+")
        b, c = rest.split("=")
        assert (int(a), int(b)) not in held and int(a) + int(b) == int(c)
