from mlxpool.pool.eviction import Resident, choose_victims


def resident(name: str, size: int, last_used: float, evictable: bool = True) -> Resident:
    return Resident(name, size, last_used, evictable)


def test_least_recently_used_go_first() -> None:
    residents = [resident("a", 10, 3.0), resident("b", 10, 1.0), resident("c", 10, 2.0)]
    assert choose_victims(residents, 15) == ["b", "c"]


def test_stops_once_enough_is_freed() -> None:
    residents = [resident("a", 100, 1.0), resident("b", 10, 2.0)]
    assert choose_victims(residents, 50) == ["a"]


def test_unevictable_models_are_never_chosen() -> None:
    residents = [resident("pinned", 100, 0.0, evictable=False), resident("b", 10, 5.0)]
    assert choose_victims(residents, 10) == ["b"]


def test_none_when_even_all_evictable_models_are_not_enough() -> None:
    residents = [resident("a", 10, 1.0), resident("leased", 100, 0.0, evictable=False)]
    assert choose_victims(residents, 50) is None


def test_nothing_needed_means_no_victims() -> None:
    assert choose_victims([resident("a", 10, 1.0)], 0) == []
