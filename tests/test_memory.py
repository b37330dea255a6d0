"""The in-memory store on its own: no network, no Twisted."""

from hypothesis import given, strategies as st

from kvtwist.storage.interface import Batch, IStore
from kvtwist.storage.memory import MemoryStore

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def test_put_stores_only_absent_keys() -> None:
    store = MemoryStore()
    assert store.put(1, 2, Batch()) is True
    assert store.put(1, 3, Batch()) is False
    assert store.get(1, Batch()) == 2


def test_get_missing_key() -> None:
    assert MemoryStore().get(5, Batch()) is None


def test_delete() -> None:
    store = MemoryStore()
    store.put(1, 0, Batch())
    assert store.delete(1, Batch()) is True
    assert store.get(1, Batch()) is None
    assert store.delete(1, Batch()) is False


def test_zero_value_is_present() -> None:
    store = MemoryStore()
    store.put(0, 0, Batch())
    assert 0 in store
    assert store.delete(0, Batch()) is True
    assert 0 not in store


def test_len_and_items() -> None:
    store = MemoryStore()
    for k in range(10):
        store.put(k, -k, Batch())
    store.delete(3, Batch())
    assert len(store) == 9
    assert sorted(store.items()) == [(k, -k) for k in range(10) if k != 3]


@given(st.lists(st.tuples(st.sampled_from(["put", "get", "del"]), int64, int64), max_size=200))
def test_behaves_like_a_dict(ops: list[tuple[str, int, int]]) -> None:
    store, model = MemoryStore(), {}
    for op, key, value in ops:
        if op == "put":
            assert store.put(key, value, Batch()) == (key not in model)
            model.setdefault(key, value)
        elif op == "get":
            assert store.get(key, Batch()) == model.get(key)
        else:
            assert store.delete(key, Batch()) == (model.pop(key, None) is not None)
    assert dict(store.items()) == model
    assert len(store) == len(model)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[Batch] = []

    def sendReplies(self, batch: Batch) -> None:
        self.sent.append(batch)

    def abandonReplies(self) -> None:
        raise AssertionError("an in-memory store has nothing to abandon")


def test_it_is_a_store_that_delivers_at_once_and_waits_for_nothing() -> None:
    store, target, batch = MemoryStore(), Recorder(), Batch(b"OK\n")
    assert isinstance(store, IStore)
    assert store.put(1, 2, batch) and store.get(1, batch) == 2
    store.deliver(target, batch)
    assert target.sent == [batch] and batch.waitFor == 0


def test_a_full_store_refuses_new_keys_only() -> None:
    import pytest

    from kvtwist.storage.interface import StoreError

    store = MemoryStore(maxKeys=2)
    assert store.put(1, 1, Batch()) and store.put(2, 2, Batch())
    assert store.full
    with pytest.raises(StoreError, match="store is full"):
        store.put(3, 3, Batch())
    assert store.put(1, 5, Batch()) is False, "an existing key still says so"
    assert store.get(1, Batch()) == 1 and len(store) == 2
    assert store.delete(2, Batch())
    assert not store.full and store.put(3, 3, Batch())
    assert sorted(store.items()) == [(1, 1), (3, 3)]
