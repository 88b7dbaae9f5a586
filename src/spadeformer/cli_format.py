"""The help formatter of every ``spadeformer`` subcommand."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where there is nothing to show:
    required options, flags (default False) and options whose default None is explained by
    the help text itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default  # identity: 0 and 0.0 are defaults worth showing
        if action.required or default is None or default is False or default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)
