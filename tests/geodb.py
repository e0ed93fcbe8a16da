"""A small MaxMind-format city database for tests, written with ``mmdb-writer``."""

from __future__ import annotations

from pathlib import Path

from mmdb_writer import MMDBWriter
from netaddr import IPSet


def city(country: str, region: str, name: str) -> dict:
    """A record in the GeoLite2-City layout."""
    return {
        "city": {"geoname_id": 1, "names": {"en": name, "de": name + "-de"}},
        "country": {"iso_code": country, "names": {"en": country + " land"}},
        "subdivisions": [{"iso_code": "XX", "names": {"en": region}}],
        "location": {"latitude": 1.5, "longitude": 2.5},
    }


NETWORKS = {
    "203.0.113.0/25": city("DE", "Berlin", "Berlin"),
    "203.0.113.128/25": city("FR", "Normandy", "Rouen"),
    "198.51.100.0/24": {"country": {"iso_code": "JP", "names": {"en": "Japan"}}},
    "2001:db8:1::/48": city("US", "Oregon", "Portland"),
}


def write_database(path: Path) -> Path:
    writer = MMDBWriter(ip_version=6, database_type="GeoLite2-City", languages=["en", "de"],
                        description="relay test database", ipv4_compatible=True)
    for network, record in NETWORKS.items():
        writer.insert_network(IPSet([network]), record)
    writer.to_db_file(str(path))
    return path
