"""Subcommands of ``depthpro-fast`` (see ``depthpro_fast.cli``)."""
