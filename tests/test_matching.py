"""Tests for detr_jax.matching against Hugging Face's copy of the official DETR matcher."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from transformers.loss import loss_deformable_detr as hf_deformable
from transformers.loss import loss_for_object_detection as hf_loss

from detr_jax import matching

NUM_CLASSES = 5  # logits have NUM_CLASSES + 1 entries, the last is no-object


def _loss_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      matcher="hungarian_host", class_cost_type="softmax", cost_class=1.0, cost_bbox=5.0,
      cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0))
  config.update(overrides)
  return config


def _random_batch(seed, layers=3, batch=3, queries=12, slots=6):
  """Random predictions [L,B,Q,..] and padded targets: interleaved padding, a tiny box, no boxes."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(layers, batch, queries, NUM_CLASSES + 1)).astype(np.float32) * 2
  centres = rng.uniform(0.2, 0.8, size=(layers, batch, queries, 2))
  sizes = rng.uniform(0.02, 0.5, size=(layers, batch, queries, 2))
  boxes = np.concatenate([centres, sizes], -1).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=(batch, slots)).astype(np.int32)
  target_boxes = np.concatenate([rng.uniform(0.2, 0.8, size=(batch, slots, 2)),
                                 rng.uniform(0.05, 0.4, size=(batch, slots, 2))], -1)
  target_boxes = target_boxes.astype(np.float32)
  valid = rng.uniform(size=(batch, slots)) < 0.7
  valid[0, :2] = [True, False]  # padding between real boxes
  if batch > 1:
    valid[1, 0] = True
    target_boxes[1, 0, 2:] = 1e-4  # a tiny box
  valid[-1] = False  # an image without boxes
  # Padding slots hold garbage, which must not matter.
  labels[~valid] = -1
  target_boxes[~valid] = 0.0
  targets = {"labels": labels, "boxes": target_boxes, "valid": valid}
  return logits, boxes, targets


def _hf_targets(targets):
  """Padded targets -> the list of per-image dicts HF takes (an empty tensor for no boxes)."""
  return [{"class_labels": torch.tensor(labels[valid], dtype=torch.int64),
           "boxes": torch.tensor(boxes[valid])}
          for labels, boxes, valid in zip(targets["labels"], targets["boxes"], targets["valid"])]


def _hf_match(hf_matcher, logits, boxes, targets, monkeypatch):
  """Runs an HF matcher on one decoder output; returns its indices and the costs it solved."""
  solved = []
  real_solver = hf_loss.linear_sum_assignment

  def recording_solver(cost):
    solved.append(np.array(torch.as_tensor(cost).numpy()))
    return real_solver(cost)

  monkeypatch.setattr(hf_loss, "linear_sum_assignment", recording_solver)
  monkeypatch.setattr(hf_deformable, "linear_sum_assignment", recording_solver)
  outputs = {"logits": torch.tensor(logits), "pred_boxes": torch.tensor(boxes)}
  indices = hf_matcher(outputs, _hf_targets(targets))
  return indices, solved


@pytest.mark.parametrize("class_cost_type", ["softmax", "focal"])
def test_cost_matrix_equals_reference(class_cost_type, monkeypatch):
  logits, boxes, targets = _random_batch(0, layers=1)
  config = _loss_config(class_cost_type=class_cost_type)
  if class_cost_type == "softmax":
    hf_matcher = hf_loss.HungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
    hf_logits = logits[0]
  else:  # Deformable DETR has no no-object logit: give it the real-class logits only.
    hf_matcher = hf_deformable.DeformableDetrHungarianMatcher(
        class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
    hf_logits = logits[0][..., :-1]
  _, solved = _hf_match(hf_matcher, hf_logits, boxes[0], targets, monkeypatch)
  cost = np.asarray(matching.matching_cost(logits[0], boxes[0], targets["labels"],
                                           targets["boxes"], config))  # [B, Q, M]
  assert len(solved) == len(cost)
  for image_cost, valid, expected in zip(cost, targets["valid"], solved):
    assert expected.shape == (cost.shape[1], valid.sum())
    np.testing.assert_allclose(image_cost[:, valid], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("matcher", ["hungarian_host", "hungarian_device"])
def test_matchers_give_reference_indices(matcher, monkeypatch):
  logits, boxes, targets = _random_batch(1)
  hf_matcher = hf_loss.HungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
  config = _loss_config(matcher=matcher)
  match_indices = np.asarray(jax.jit(lambda l, b, t: matching.match(l, b, t, config))(
      logits, boxes, targets))  # [L, B, M]
  assert match_indices.dtype == np.int32
  for layer in range(len(logits)):
    indices, _ = _hf_match(hf_matcher, logits[layer], boxes[layer], targets, monkeypatch)
    for image, (query_index, target_index) in enumerate(indices):
      valid_slots = np.flatnonzero(targets["valid"][image])
      expected = np.full(targets["valid"].shape[1], -1)
      expected[valid_slots[target_index.numpy()]] = query_index.numpy()
      np.testing.assert_array_equal(match_indices[layer, image], expected)
  assert np.all(match_indices[:, -1] == -1)  # the image without boxes


def test_host_matcher_uses_one_callback_for_all_layers(monkeypatch):
  logits, boxes, targets = _random_batch(2, layers=4)
  calls = []
  real = matching._solve_on_host

  def counting(cost, valid):
    calls.append(cost.shape)
    return real(cost, valid)

  monkeypatch.setattr(matching, "_solve_on_host", counting)
  jax.block_until_ready(jax.jit(lambda l, b, t: matching.match(l, b, t, _loss_config()))(
      logits, boxes, targets))
  assert calls == [logits.shape[:3] + (targets["valid"].shape[1],)]


@pytest.mark.parametrize("matcher", ["hungarian_host", "hungarian_device", "greedy"])
def test_more_targets_than_queries(matcher):
  rng = np.random.default_rng(3)
  cost = rng.uniform(size=(1, 1, 3, 6)).astype(np.float32)  # [L, B, Q=3, M=6]
  valid = np.array([[True, True, False, True, True, True]])
  match_indices = np.asarray(matching.get_matcher(matcher)(cost, valid))[0, 0]
  assert match_indices[2] == -1  # padding is never matched, even when queries run short
  matched = match_indices >= 0
  assert matched.sum() == 3 and len(set(match_indices[matched])) == 3
  if matcher != "greedy":
    valid_slots = np.flatnonzero(valid[0])
    best = min(sum(cost[0, 0, q, s] for q, s in enumerate(slots))
               for slots in itertools.permutations(valid_slots, 3))
    got = sum(cost[0, 0, q, s] for s, q in enumerate(match_indices) if q >= 0)
    np.testing.assert_allclose(got, best, rtol=1e-6)


def test_greedy_is_suboptimal_where_hungarian_is_not():
  # Greedy takes the cheapest pair (0, 0) = 1, then (2, 1) = 60; the optimum is 2 + 2.
  cost = np.array([[[[1.0, 2.0], [2.0, 100.0], [50.0, 60.0]]]], np.float32)  # [1, 1, 3, 2]
  valid = np.array([[True, True]])
  for name, expected in [("greedy", [0, 2]), ("hungarian_host", [1, 0]),
                         ("hungarian_device", [1, 0])]:
    np.testing.assert_array_equal(matching.get_matcher(name)(cost, valid)[0, 0], expected)


def test_query_target_indices_inverts_matching():
  match_indices = jnp.array([[[3, -1, 0], [-1, -1, -1]]], jnp.int32)  # [L=1, B=2, M=3]
  per_query = np.asarray(matching.query_target_indices(match_indices, num_queries=5))
  np.testing.assert_array_equal(per_query, [[[2, -1, -1, 0, -1], [-1] * 5]])


def test_vmap_over_host_and_device_matchers_equals_loop():
  logits, boxes, targets = _random_batch(4, layers=2)
  stacked = [_random_batch(seed, layers=2) for seed in (5, 6)]
  all_logits = np.stack([logits] + [s[0] for s in stacked])
  all_boxes = np.stack([boxes] + [s[1] for s in stacked])
  for matcher in ("hungarian_host", "hungarian_device"):
    config = _loss_config(matcher=matcher)
    vmapped = jax.jit(jax.vmap(lambda l, b: matching.match(l, b, targets, config)))(
        all_logits, all_boxes)
    for i in range(len(all_logits)):
      np.testing.assert_array_equal(vmapped[i],
                                    matching.match(all_logits[i], all_boxes[i], targets, config))


@pytest.mark.parametrize("matcher,check_vma", [("hungarian_host", True), ("greedy", True),
                                               ("hungarian_device", False)])
def test_shard_map_on_8_devices_equals_one_device(matcher, check_vma):
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py should provide 8 CPU devices"
  logits, boxes, targets = _random_batch(7, layers=2, batch=16, queries=10, slots=5)
  config = _loss_config(matcher=matcher)

  def match_fn(logits, boxes, targets):
    return matching.match(logits, boxes, targets, config)

  mesh = jax.make_mesh((8,), ("data",), devices=devices)
  sharding = jax.sharding.NamedSharding(mesh, P(None, "data"))
  batch_sharding = jax.sharding.NamedSharding(mesh, P("data"))
  sharded_inputs = (jax.device_put(logits, sharding), jax.device_put(boxes, sharding),
                    jax.device_put(targets, batch_sharding))
  sharded = jax.jit(jax.shard_map(
      match_fn, mesh=mesh, in_specs=(P(None, "data"), P(None, "data"), P("data")),
      out_specs=P(None, "data"), check_vma=check_vma))
  with jax.default_device(devices[0]):
    expected = np.asarray(jax.jit(match_fn)(logits, boxes, targets))
  np.testing.assert_array_equal(np.asarray(sharded(*sharded_inputs)), expected)
  if matcher == "hungarian_device":  # With the type check on, it says what to do instead.
    with pytest.raises(ValueError, match="check_vma=False"):
      jax.jit(jax.shard_map(match_fn, mesh=mesh, in_specs=(P(None, "data"), P(None, "data"),
                                                           P("data")),
                            out_specs=P(None, "data")))(*sharded_inputs)


def test_query_order_adds_the_rank_to_every_cost():
  logits, boxes, targets = _random_batch(9, layers=2)
  args = (logits, boxes, targets["labels"][None], targets["boxes"][None])
  plain = np.asarray(matching.matching_cost(*args, _loss_config()))
  ordered = np.asarray(matching.matching_cost(*args, _loss_config(cost_query_order=2.0)))
  queries = logits.shape[2]
  rank = 2.0 * np.arange(queries, dtype=np.float32) / queries  # 2 * q / Q on row q
  np.testing.assert_allclose(ordered - plain, np.broadcast_to(rank[:, None], plain.shape),
                             rtol=0, atol=1e-5)
  # 0 is the official cost, bit for bit.
  np.testing.assert_array_equal(
      np.asarray(matching.matching_cost(*args, _loss_config(cost_query_order=0.0))), plain)


@pytest.mark.parametrize("matcher", ["hungarian_host", "hungarian_device", "greedy"])
def test_query_order_gives_a_near_tie_to_the_lower_query(matcher):
  # Queries 1 and 4 predict the target's class with the same score and boxes 1e-3 apart; the
  # other queries are far off. The plain cost takes the nearer box; with the query order, a
  # cost difference below w * (4 - 1) / Q goes to query 1 whichever box is nearer.
  queries = 6
  logits = np.full((1, 1, queries, NUM_CLASSES + 1), -4.0, np.float32)
  boxes = np.tile(np.asarray([0.1, 0.1, 0.05, 0.05], np.float32), (1, 1, queries, 1))
  targets = {"labels": np.asarray([[2, 0]], np.int32),
             "boxes": np.asarray([[[0.6, 0.5, 0.3, 0.2], [0, 0, 0, 0]]], np.float32),
             "valid": np.asarray([[True, False]])}
  for q in (1, 4):
    logits[0, 0, q, 2] = 3.0
    boxes[0, 0, q] = targets["boxes"][0, 0]

  def matched(offset_1, offset_4, order):
    shifted = boxes.copy()
    shifted[0, 0, 1, 0] += offset_1
    shifted[0, 0, 4, 0] += offset_4
    config = _loss_config(matcher=matcher, cost_query_order=order)
    indices = np.asarray(matching.match(logits, shifted, targets, config))
    assert indices[0, 0, 1] == -1  # the padding slot stays unmatched
    return indices[0, 0, 0]

  assert matched(0.0, 1e-3, order=0.0) == 1
  assert matched(1e-3, 0.0, order=0.0) == 4
  # 0.5 * 3 / 6 = 0.25 outweighs the L1 cost difference 5 * 1e-3.
  assert matched(1e-3, 0.0, order=0.5) == 1
  assert matched(0.0, 1e-3, order=0.5) == 1
  # A large difference still wins over the order: query 1's box far off goes to query 4.
  assert matched(0.2, 0.0, order=0.5) == 4


def test_unknown_names_raise_value_error():
  logits, boxes, targets = _random_batch(8, layers=1)
  with pytest.raises(ValueError, match="matcher"):
    matching.match(logits, boxes, targets, _loss_config(matcher="auction"))
  with pytest.raises(ValueError, match="class_cost_type"):
    matching.match(logits, boxes, targets, _loss_config(class_cost_type="hinge"))
