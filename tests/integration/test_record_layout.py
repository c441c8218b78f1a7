"""The record as the BPF compiler lays it out is the record the decoder unpacks: every
member's name, offset and size (BCC describes a map's value type to Python as a ctypes
Structure built from clang's own layout)."""
import os

import pytest

from tracer import record
from tracer.probes import capabilities
from tracer.probes.loader import expand_local_includes, header_tree, import_bcc

pytestmark = pytest.mark.root


def test_the_compiled_record_is_the_decoders():
    bcc = import_bcc()
    tree = header_tree(capabilities.detect())
    if tree:
        os.environ["BCC_KERNEL_SOURCE"] = tree
    text = expand_local_includes("record.h") + "BPF_ARRAY(record_layout, struct rst_event, 1);\n"
    b = bcc.BPF(text=text.encode())
    try:
        leaf = b["record_layout"].Leaf
        assert [name for name, *_ in leaf._fields_] == [name for name, *_ in record.FIELDS]
        assert record.layout_mismatches(leaf) == []
    finally:
        b.cleanup()
