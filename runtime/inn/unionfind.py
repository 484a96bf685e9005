"""Union-find over channel dimensions: tying two dims merges their groups."""

from __future__ import annotations

from runtime.inn.layout import ConversionError


class UnionFind:
    """Groups of tied dims. A group is continuous when some layer produced it (``anchored``)
    and nothing tied it to a fixed size (``discrete``: model inputs/outputs, pinned dims)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.origin: list[str] = []
        self.discrete: list[bool] = []
        self.anchored: list[bool] = []
        self.blocks: list[int] = []

    def new(self, size: int, origin: str, *, discrete=False, anchored=True) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.origin.append(origin)
        self.discrete.append(discrete)
        self.anchored.append(anchored)
        self.blocks.append(1)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise ConversionError(
                f"{where}: ties a dimension of {self.size[ra]} channels to one of "
                f"{self.size[rb]} (groups from {self.origin[ra]!r} and {self.origin[rb]!r})"
            )
        ba, bb = self.blocks[ra], self.blocks[rb]
        if ba > 1 and bb > 1 and ba != bb:
            raise ConversionError(f"{where}: ties grouped convs with {ba} and {bb} groups")
        # The earliest layer names the group (a raw parameter's dims only when no layer does).
        keep, drop = sorted((ra, rb), key=lambda r: (not self.anchored[r], r))
        self.parent[drop] = keep
        self.discrete[keep] |= self.discrete[drop]
        self.anchored[keep] |= self.anchored[drop]
        self.blocks[keep] = max(ba, bb)
        return keep

    def pin(self, g: int) -> None:
        """Fix group ``g``'s size for good (it can never become continuous)."""
        self.discrete[self.find(g)] = True

    def anchor(self, g: int) -> None:
        """Mark group ``g`` as produced by a layer (continuous unless pinned)."""
        self.anchored[self.find(g)] = True

    def continuous(self, g: int) -> bool:
        r = self.find(g)
        return self.anchored[r] and not self.discrete[r]
