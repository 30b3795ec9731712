"""A background worker for Keg: no web port, just work and a line of output per step.

Every TICK_SECONDS (2 unless `keg config set ticker TICK_SECONDS=…` says otherwise) it
finds the next prime number and prints it; `keg logs` shows the lines. It stops at once on
SIGTERM (the Mayor's stop), like any Procfile process.
"""

import os
import time


def primes():
    """2, 3, 5, 7, … one at a time."""
    found = []
    candidate = 2
    while True:
        if all(candidate % p for p in found if p * p <= candidate):
            found.append(candidate)
            yield candidate
        candidate += 1


def main():
    interval = float(os.environ.get("TICK_SECONDS", "2"))
    print(f"ticker: a prime every {interval:g} s", flush=True)
    for number, prime in enumerate(primes(), 1):
        print(f"tick {number}: prime {prime}", flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    main()
