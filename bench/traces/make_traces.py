"""Writes the scaler's traces (CSV: arrival_secs,model,width,height,steps,n), deterministically.

  steady.csv     SD 1.5 512² 25-step jobs, Poisson at 0.25/s for an hour
  bursty.csv     a Discord server's evening: 0.02/s for an hour, then 1.5/s for 10 minutes,
                 then 0.02/s for another hour
  diurnal.csv    a day: a rate swinging from 0.01/s at night to 0.3/s in the evening
  heavy_tail.csv a mix of sizes and models, Poisson at 0.1/s for two hours: mostly SD 1.5
                 512², some SDXL 1024², a few 2048² and 150-step jobs, n up to 8

Run: python3 bench/traces/make_traces.py (writes beside itself).
"""
import math
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = "arrival_secs,model,width,height,steps,n"


def poisson(rng, rate_at, end, start=0.0, peak=None):
    """Arrival times of a Poisson process with rate rate_at(t) on [start, end), by thinning."""
    peak = peak or max(rate_at(start + (end - start) * i / 1000) for i in range(1001))
    t, out = start, []
    while True:
        t += rng.expovariate(peak)
        if t >= end:
            return out
        if rng.random() * peak <= rate_at(t):
            out.append(t)


def sd15(_rng):
    return ("sd15", 512, 512, 25, 1)


def mixed(rng):
    r = rng.random()
    if r < 0.55:
        shape = ("sd15", 512, 512, rng.choice([20, 25, 30]), 1)
    elif r < 0.75:
        shape = ("sd15", 768, 768, 25, rng.choice([1, 1, 2, 4]))
    elif r < 0.92:
        shape = ("sdxl", 1024, 1024, rng.choice([20, 30]), rng.choice([1, 1, 2]))
    elif r < 0.97:
        shape = ("sdxl-turbo", 512, 512, 4, rng.choice([1, 4, 8]))
    else:
        shape = ("sd15", 2048, 2048, rng.choice([50, 150]), 1)
    return shape


def write(name, times, shape, seed):
    rng = random.Random(seed)
    with open(os.path.join(HERE, name), "w") as f:
        f.write(HEADER + "\n")
        for t in times:
            model, w, h, steps, n = shape(rng)
            f.write(f"{t:.3f},{model},{w},{h},{steps},{n}\n")


def main():
    rng = random.Random(1)
    write("steady.csv", poisson(rng, lambda t: 0.25, 3600.0), sd15, 11)

    def evening(t):
        return 1.5 if 3600.0 <= t < 4200.0 else 0.02

    write("bursty.csv", poisson(rng, evening, 7800.0, peak=1.5), sd15, 12)

    def day(t):
        # Lowest at 04:00, highest at 20:00.
        phase = 2 * math.pi * (t / 86400.0 - 20.0 / 24.0)
        return 0.155 + 0.145 * math.cos(phase)

    write("diurnal.csv", poisson(rng, day, 86400.0, peak=0.3), sd15, 13)
    write("heavy_tail.csv", poisson(rng, lambda t: 0.1, 7200.0), mixed, 14)


if __name__ == "__main__":
    main()
