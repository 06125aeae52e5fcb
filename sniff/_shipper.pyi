"""Types of the C extension sniff/_shipper.c."""

from collections.abc import Callable
from typing import Any

class Shipper:
    @property
    def gap(self) -> bool: ...
    def __init__(
        self, owner: Any, conn: int, direction: int, slow: Callable[[bytes], None]
    ) -> None: ...
    def __call__(self, data: bytes) -> None: ...
    def tag_head(self, head: bytes) -> bytes | None: ...

class Tee:
    slow: Callable[[bytes], Any] | None
    @property
    def nbytes(self) -> int: ...
    @property
    def fast(self) -> bool: ...
    @property
    def lean(self) -> bool: ...
    @property
    def head(self) -> bool: ...
    def data_received(self, data: bytes) -> None: ...
    def set_fast(self, write: Callable[[bytes], Any], shipper: Callable[[bytes], None]) -> None: ...
    def set_lean(
        self,
        write: Callable[[bytes], Any],
        shipper: Shipper,
        decoder: Any,
        stream: Any,
        rewrite: bool,
        err: Callable[[BaseException, bytes, bool], None] | None = None,
    ) -> None: ...
    def set_head(
        self,
        write: Callable[[bytes], Any],
        injector: Any,
        tagger: Callable[[bytes], bytes | None],
        head_state: int,
    ) -> None: ...
    def fast_off(self) -> None: ...

def lean_feed(decoder: Any, stream: Any, data: bytes) -> tuple[Any, ...]:
    """(out, None, 0), or (out, error, position, data) on a framing error."""
