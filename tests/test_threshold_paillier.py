"""Threshold Paillier: any t of l decryptors decrypt, t - 1 do not; shares, files, refusals.

Keys are 512 bits (insecure, fast). The safe primes are made once per module and
dealt from directly, so that the tests know p, q, d and can check the shares
against them; one call goes through the public dealer as well.
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
import stat

import gmpy2
import pytest

from fedapp.crypto.keys import PrivateKey, PublicKey, make_obfuscators
from fedapp.crypto.threshold import (
    PARAMS_FILE,
    KeyShare,
    ThresholdParams,
    _deal_from_primes,
    combine_partials,
    deal_threshold_key,
    generate_safe_prime,
    lagrange_coefficients,
    load_share,
    load_threshold_params,
    partial_decrypt,
    save_shares,
    share_file_name,
)
from fedapp.crypto.vectors import encrypt_plaintexts

BITS = 512
PARTIES = 4


@pytest.fixture(scope="module")
def primes():
    p = generate_safe_prime(BITS // 2)
    q = generate_safe_prime(BITS // 2)
    while q == p:
        q = generate_safe_prime(BITS // 2)
    return p, q


@pytest.fixture(scope="module")
def deals(primes):
    """threshold -> (public key, shares) for 2-of-4 and 3-of-4, from the same primes."""
    p, q = primes
    return {t: _deal_from_primes(p, q, threshold=t, num_parties=PARTIES) for t in (2, 3)}


def _encrypt(public_key, plaintexts):
    obfuscators = make_obfuscators(len(plaintexts), public_key=public_key)
    return encrypt_plaintexts(plaintexts, public_key, obfuscators)


def _secret_d(primes):
    p, q = (gmpy2.mpz(x) for x in primes)
    n, m = p * q, (p - 1) // 2 * ((q - 1) // 2)
    return n, m, m * gmpy2.invert(m, n)


def _attempt(partials, indices, public_key, scale):
    """An adversary's Lagrange attempt on whatever partials it has: L(prod c_i^(2 lambda_i)) / scale mod n."""
    n, n2 = public_key.n, public_key.nsquare
    lambdas = lagrange_coefficients(indices, num_parties=PARTIES)
    u = gmpy2.mpz(1)
    for i in indices:
        u = u * gmpy2.powmod(partials[i], 2 * lambdas[i], n2) % n2
    return int((u - 1) // n * gmpy2.invert(scale % n, n) % n), int(u % n)


@pytest.mark.parametrize("t", [2, 3])
def test_every_subset_of_t_decrypts_exactly(deals, t):
    public_key, shares = deals[t]
    n = int(public_key.n)
    plaintexts = [0, 1, 12345, n - 1, n - 2, secrets.randbelow(n)]
    ciphertexts = _encrypt(public_key, plaintexts)
    partials = {s.index: partial_decrypt(ciphertexts, s) for s in shares}
    for subset in itertools.combinations(range(1, PARTIES + 1), t):
        got = combine_partials({i: partials[i] for i in subset}, public_key, threshold=t, num_parties=PARTIES)
        assert got == plaintexts, subset
    # More than t partials: any t of them are used, the answer is the same.
    assert combine_partials(partials, public_key, threshold=t, num_parties=PARTIES) == plaintexts


def test_agrees_with_phe_private_key_and_homomorphic_sum(deals, primes):
    public_key, shares = deals[3]
    n, n2 = int(public_key.n), public_key.nsquare
    private_key = PrivateKey(public_key, *primes)
    values = [n - 1, n - 7, 5, secrets.randbelow(n), secrets.randbelow(n)]
    ciphertexts = [public_key.phe.raw_encrypt(v) for v in values]
    total = gmpy2.mpz(1)
    for c in ciphertexts:
        total = total * c % n2
    batch = [*ciphertexts, int(total)]
    partials = [(s.index, s.partial_decrypt(batch)) for s in shares[1:]]  # decryptors 2, 3, 4 as pairs
    got = combine_partials(partials, public_key, threshold=3, num_parties=PARTIES)
    assert got == [private_key.phe.raw_decrypt(c) for c in batch]
    assert got[:-1] == values
    assert got[-1] == sum(values) % n  # the sum wraps modulo n exactly as with the private key


@pytest.mark.parametrize("t", [2, 3])
def test_t_minus_one_shares_learn_nothing_and_are_refused(deals, t):
    public_key, shares = deals[t]
    n = int(public_key.n)
    delta = math.factorial(PARTIES)
    plaintexts = [secrets.randbelow(n) for _ in range(4)]
    ciphertexts = _encrypt(public_key, plaintexts)
    partials = {s.index: partial_decrypt(ciphertexts, s) for s in shares}
    for subset in itertools.combinations(range(1, PARTIES + 1), t - 1):
        for k, m in enumerate(plaintexts):
            column = {i: partials[i][k] for i in subset}
            for scale in (4 * delta * delta, 4 * delta, 4, 1):
                recovered, u_mod_n = _attempt(column, subset, public_key, scale)
                assert recovered != m
                assert u_mod_n != 1  # not even of the form 1 + kn: no plaintext is in there
        few = {i: partials[i] for i in subset}
        with pytest.raises(ValueError, match=rf"threshold is {t}: cannot decrypt"):
            combine_partials(few, public_key, threshold=t, num_parties=PARTIES)
        # Lying about the threshold does not help: the combination is not a plaintext.
        with pytest.raises(ValueError, match="do not combine"):
            combine_partials(few, public_key, threshold=t - 1, num_parties=PARTIES)


def test_wrong_partial_garbage_refused_crafted_shifts_silently(deals):
    """The documented limit: no correctness proofs, so a crafted partial shifts the plaintext."""
    public_key, shares = deals[2]
    n, n2 = public_key.n, public_key.nsquare
    ciphertexts = _encrypt(public_key, [1000])
    good = {s.index: partial_decrypt(ciphertexts, s) for s in shares[:2]}
    garbage = {1: good[1], 2: [int(gmpy2.powmod(3, 65537, n2))]}
    with pytest.raises(ValueError, match="do not combine"):
        combine_partials(garbage, public_key, threshold=2, num_parties=PARTIES)
    crafted = {1: good[1], 2: [int(good[2][0] * (1 + n) % n2)]}
    shifted = combine_partials(crafted, public_key, threshold=2, num_parties=PARTIES)
    assert shifted != [1000]


def test_shares_are_distinct_and_hide_d(deals, primes):
    n, m, d = _secret_d(primes)
    for t, (public_key, shares) in deals.items():
        assert public_key.n == n and public_key.bits == BITS
        values = [s.value for s in shares]
        assert [s.index for s in shares] == list(range(1, PARTIES + 1))
        assert len(set(values)) == PARTIES
        for v in values:
            assert v != d and 0 <= v < n * m
            assert v % n != 1  # d = 1 mod n is public knowledge; a share must not share it
            assert v % m != 0  # nor d = 0 mod m
        delta = math.factorial(PARTIES)
        for subset in itertools.combinations(range(1, PARTIES + 1), t):
            lam = lagrange_coefficients(subset, num_parties=PARTIES)
            assert sum(lam[i] * values[i - 1] for i in subset) % (n * m) == delta * d % (n * m)
        for subset in itertools.combinations(range(1, PARTIES + 1), t - 1):
            lam = lagrange_coefficients(subset, num_parties=PARTIES)
            assert sum(lam[i] * values[i - 1] for i in subset) % (n * m) != delta * d % (n * m)


def test_public_dealer_makes_a_working_key():
    public_key, shares = deal_threshold_key(BITS, threshold=2, num_parties=3)
    assert public_key.bits == BITS and len(shares) == 3
    assert all(s.params == ThresholdParams(2, 3, public_key.key_id) for s in shares)
    c = _encrypt(public_key, [42])
    got = combine_partials({s.index: s.partial_decrypt(c) for s in shares[::2]}, public_key, threshold=2, num_parties=3)
    assert got == [42]


def test_share_files_round_trip_mode_and_key_check(deals, tmp_path):
    public_key, shares = deals[3]
    stale = tmp_path / share_file_name(2)
    stale.write_text("{}")
    stale.chmod(0o644)  # an existing file must still end up 0600
    save_shares(tmp_path, public_key, shares)
    for share in shares:
        path = tmp_path / share_file_name(share.index)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert load_share(tmp_path, share.index) == share
        assert load_share(path) == share
    params = load_threshold_params(tmp_path)
    assert params == shares[0].params and json.loads((tmp_path / PARAMS_FILE).read_text())["threshold"] == 3
    with pytest.raises(ValueError, match="holds share 1, not 2"):
        load_share(tmp_path / share_file_name(1), 2)
    with pytest.raises(ValueError, match="index is required"):
        load_share(tmp_path)
    other = PublicKey(int(public_key.n) + 2)
    with pytest.raises(ValueError, match="does not belong"):
        load_share(tmp_path, 1, public_key=other)
    data = shares[0].to_dict()
    with pytest.raises(ValueError, match="does not belong"):
        KeyShare.from_dict({**data, "key_id": other.key_id}, public_key)
    with pytest.raises(ValueError, match="not a threshold key share"):
        KeyShare.from_dict({**data, "kind": "paillier-private"}, public_key)


def test_repr_hides_the_share(deals):
    _, shares = deals[2]
    for share in shares:
        text = repr(share) + str(share)
        assert format(share.value, "x") not in text and str(share.value) not in text
        assert "value" not in text and share.key_id in text


def test_bad_inputs_refused(deals):
    public_key, shares = deals[2]
    n = int(public_key.n)
    with pytest.raises(ValueError, match="threshold 5 > num_parties 4"):
        deal_threshold_key(BITS, threshold=5, num_parties=4)
    with pytest.raises(ValueError, match="threshold must be an integer >= 1"):
        deal_threshold_key(BITS, threshold=0, num_parties=4)
    with pytest.raises(ValueError, match="num_parties"):
        ThresholdParams(1, 0, public_key.key_id)
    with pytest.raises(ValueError, match="bits"):
        deal_threshold_key(500, threshold=1, num_parties=2)
    with pytest.raises(ValueError, match="index must be in 1..4"):
        KeyShare(0, 5, public_key, shares[0].params)
    c = _encrypt(public_key, [7, 8])
    p1, p2 = (partial_decrypt(c, s) for s in shares[:2])
    combine = dict(public_key=public_key, threshold=2, num_parties=PARTIES)
    with pytest.raises(ValueError, match="appears twice"):
        combine_partials([(1, p1), (1, p1)], **combine)
    with pytest.raises(ValueError, match=r"outside 1..4"):
        combine_partials({0: p1, 2: p2}, **combine)
    with pytest.raises(ValueError, match=r"outside 1..4"):
        combine_partials({1: p1, 5: p2}, **combine)
    with pytest.raises(ValueError, match="different lengths"):
        combine_partials({1: p1, 2: p2[:1]}, **combine)
    for bad in (0, n, n * n, -1):
        with pytest.raises(ValueError, match=r"Z\*_\(n\^2\)"):
            combine_partials({1: p1, 2: [p2[0], bad]}, **combine)
        with pytest.raises(ValueError, match=r"ciphertexts\[1\] is not an element"):
            partial_decrypt([c[0], bad], shares[0])
    with pytest.raises(ValueError, match="integer index"):
        combine_partials({"1": p1, 2: p2}, **combine)
    with pytest.raises(ValueError, match="distinct"):
        lagrange_coefficients([1, 1], num_parties=PARTIES)
    with pytest.raises(ValueError, match="threshold"):
        combine_partials({1: p1, 2: p2}, public_key, threshold=3, num_parties=2)
