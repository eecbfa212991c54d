"""TEMPORARY during the issue 15 move: see `sdserve_protocol.canvas`."""

from sdserve_protocol.canvas import *
