"""Interface contract tests that every dccfs policy must pass."""
import pytest

from dccfs.policies import POLICY_NAMES, Policy, make_policy, simulate

KIB = 1024


@pytest.fixture(params=POLICY_NAMES)
def name(request):
    return request.param


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        make_policy("nope", 100)
    for name in POLICY_NAMES:
        assert name in str(err.value)


def test_basic_contract(name):
    policy = make_policy(name, 10 * KIB)
    assert isinstance(policy, Policy)
    key = ("inode", 7, 0)
    assert key not in policy and len(policy) == 0
    assert policy.access(key) is False
    admitted, evicted = policy.admit(key, 3 * KIB)
    assert admitted and evicted == []
    assert key in policy and len(policy) == 1 and policy.used == 3 * KIB
    assert policy.access(key) is True
    assert list(policy.keys()) == [key]
    policy.remove(key)
    policy.remove(key)  # no-op when absent
    assert key not in policy and policy.used == 0 and len(policy) == 0


def test_too_big_is_refused(name):
    policy = make_policy(name, 10 * KIB)
    assert policy.admit("big", 10 * KIB + 1) == (False, [])
    assert "big" not in policy and policy.used == 0


def test_budget_is_respected_and_evictions_reported(name):
    policy = make_policy(name, 64 * KIB)
    resident = set()
    for i in range(500):
        key = i % 97
        size = (i * 7919) % (16 * KIB) + 1
        if not policy.access(key):
            admitted, evicted = policy.admit(key, size)
            resident.difference_update(evicted)
            if admitted:
                resident.add(key)
        assert policy.used <= policy.capacity
        assert set(policy.keys()) == resident
        assert len(policy) == len(resident)
        assert policy.used == sum(policy.size_of(k) for k in resident)


def test_resize_evicts_to_new_budget(name):
    policy = make_policy(name, 100 * KIB)
    for i in range(50):
        if not policy.access(i):
            policy.admit(i, 2 * KIB)
        policy.access(i)
    before = set(policy.keys())
    evicted = policy.resize(10 * KIB)
    assert policy.used <= 10 * KIB
    assert set(policy.keys()) == before - set(evicted)
    assert policy.resize(200 * KIB) == []
    for i in range(100, 150):
        policy.admit(i, 2 * KIB)
    assert policy.used <= 200 * KIB


def test_shed_frees_bytes_and_keeps_the_budget(name):
    policy = make_policy(name, 100 * KIB)
    for i in range(60):
        if not policy.access(i):
            policy.admit(i, 2 * KIB, is_write=i % 3 == 0)
        policy.access(i % 7)
    before, used = set(policy.keys()), policy.used
    evicted = policy.shed(9 * KIB)
    assert used - policy.used >= 9 * KIB and policy.capacity == 100 * KIB
    assert set(policy.keys()) == before - set(evicted) and len(evicted) == len(set(evicted))
    assert policy.used == sum(policy.size_of(k) for k in policy.keys())
    assert policy.shed(0) == []
    policy.shed(10 ** 9)
    assert policy.used == 0 and len(policy) == 0
    policy.admit("again", 2 * KIB)
    assert "again" in policy


def test_readmit_resident_key_updates_size(name):
    policy = make_policy(name, 100 * KIB)
    policy.admit("k", 4 * KIB)
    admitted, _ = policy.admit("k", 2 * KIB)
    assert admitted and policy.used == 2 * KIB and len(policy) == 1


@pytest.mark.parametrize("mode", ["hot", "low", "bypass"])
def test_write_admit_modes(name, mode):
    policy = make_policy(name, 100 * KIB, write_admit=mode)
    admitted, _ = policy.admit("w", KIB, is_write=True)
    assert admitted == (mode != "bypass")
    assert ("w" in policy) == admitted


def test_bad_params_rejected(name):
    with pytest.raises((TypeError, ValueError)):
        make_policy(name, 100, no_such_param=1)
    with pytest.raises(ValueError):
        make_policy(name, 100, write_admit="sometimes")


def test_simulate_counts(name):
    trace = [("a", 10), ("b", 20), ("a", 10), ("b", 20), ("c", 5)]
    result = simulate(make_policy(name, 1000), trace)
    assert (result.hits, result.misses) == (2, 3)
    assert result.byte_hit_ratio == pytest.approx(30 / 65)
    assert result.object_hit_ratio == pytest.approx(2 / 5)
