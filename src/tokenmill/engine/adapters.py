"""Which LoRA adapters occupy the device's adapter slots. Pure Python: no torch here.

At most `capacity` adapters (`--max-active-adapters`) are on the device at once; the others
wait in host memory. A running request pins its adapter's slot. A waiting request whose
adapter is not resident gets a free slot, or else the slot of the least recently used adapter
that no running request pins (a swap: the runner copies the weights in before the step). When
every slot is pinned the request simply waits: the scheduler skips it and the batch goes on.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict


class AdapterSlots:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("max_active_adapters must be at least 1")
        self.capacity = capacity
        self.slot_of: dict[str, int] = {}
        self.pins: dict[str, int] = {}  # running requests per resident adapter
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident, least recent first
        self._free = list(range(capacity))  # a heap: low slots first keeps the stacks small
        self.num_swaps = 0  # adapters placed on the device (first loads included)

    def acquire(self, name: str) -> tuple[int, bool] | None:
        """Pin `name`: (its slot, whether it was just placed there), or None if no slot is
        free and every resident adapter is pinned."""
        slot = self.slot_of.get(name)
        placed = slot is None
        if slot is None:
            if self._free:
                slot = heapq.heappop(self._free)
            else:
                victim = next((n for n in self._lru if not self.pins.get(n)), None)
                if victim is None:
                    return None
                slot = self.slot_of.pop(victim)
                del self._lru[victim]
            self.slot_of[name] = slot
            self.num_swaps += 1
        self.pins[name] = self.pins.get(name, 0) + 1
        self._lru[name] = None
        self._lru.move_to_end(name)
        return slot, placed

    def release(self, name: str) -> None:
        n = self.pins.get(name, 0) - 1
        if n > 0:
            self.pins[name] = n
        else:
            self.pins.pop(name, None)

    def evict(self, name: str) -> int | None:
        """Forget an unloaded adapter; returns the slot it held, if it was resident."""
        self.pins.pop(name, None)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self._lru.pop(name, None)
            heapq.heappush(self._free, slot)
        return slot

    @property
    def resident(self) -> list[str]:
        return list(self._lru)
