"""Cost model and memory-budget planner: what a predictive costs, and what fits a budget."""

from .cost import CostReport, NodeCost, cost_report
from .measure import LiveBytes, measure_peak
from .plan import BudgetError, LayerRow, Plan, Planner, choose, parse_bytes, plan
from .symbolic import SymbolicCapture, capture_symbolic

__all__ = [
    "BudgetError",
    "CostReport",
    "LayerRow",
    "LiveBytes",
    "NodeCost",
    "Plan",
    "Planner",
    "SymbolicCapture",
    "capture_symbolic",
    "choose",
    "cost_report",
    "measure_peak",
    "parse_bytes",
    "plan",
]
