"""The store on its own: no network, no Twisted."""

from hypothesis import given, strategies as st

from kvtwist.storage.memory import Store

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def test_put_stores_only_absent_keys() -> None:
    store = Store()
    assert store.put(1, 2) is True
    assert store.put(1, 3) is False
    assert store.get(1) == 2


def test_get_missing_key() -> None:
    assert Store().get(5) is None


def test_delete() -> None:
    store = Store()
    store.put(1, 0)
    assert store.delete(1) is True
    assert store.get(1) is None
    assert store.delete(1) is False


def test_zero_value_is_present() -> None:
    store = Store()
    store.put(0, 0)
    assert 0 in store
    assert store.delete(0) is True
    assert 0 not in store


def test_len_and_items() -> None:
    store = Store()
    for k in range(10):
        store.put(k, -k)
    store.delete(3)
    assert len(store) == 9
    assert sorted(store.items()) == [(k, -k) for k in range(10) if k != 3]


@given(st.lists(st.tuples(st.sampled_from(["put", "get", "del"]), int64, int64), max_size=200))
def test_behaves_like_a_dict(ops: list[tuple[str, int, int]]) -> None:
    store, model = Store(), {}
    for op, key, value in ops:
        if op == "put":
            assert store.put(key, value) == (key not in model)
            model.setdefault(key, value)
        elif op == "get":
            assert store.get(key) == model.get(key)
        else:
            assert store.delete(key) == (model.pop(key, None) is not None)
    assert dict(store.items()) == model
    assert len(store) == len(model)
