"""One module per hooked library, each applied when (and only when) the application imports it.

Every hook module has the same small shape: ``TARGET`` (the module whose import
triggers it) and ``install(module)``, with what it patches named at the top.
The table of hooks lives in ``agenshield_shim._boot.HOOKS``, so that reading it
costs no extra module at start. This package is imported with the first hook (``socket``'s),
so it imports nothing itself, ``typing`` included.
"""

def guard_lets_through(host: object, port: object) -> bool:
    """Would the guard let this destination through directly? (The broker always is.)

    The hooks leave such connections alone: the broker itself, and ``AGENSHIELD_ALLOW``. A guard
    that blocks everything (a configuration it cannot trust) lets nothing through, and an address
    the guard cannot read is not direct either.
    """
    from .._boot import REASON, active_policy, decide_destination

    policy = active_policy()
    if policy is None or policy[REASON] is not None:
        return False
    try:
        return bool(decide_destination(host, port, policy))
    except Exception:
        return False


def check_destination(host: object, port: object) -> None:
    """Refuse (host, port) early, with the guard's own decision and message.

    For the library hooks: the audit hook would refuse the connection anyway, but
    only once the library has resolved the name and tried each address.
    """
    from .. import NetworkBlockedError
    from .._boot import _display, active_policy, blocked_message, format_destination
    from .._log import report_block

    policy = active_policy()
    if policy is None or guard_lets_through(host, port):
        return
    _, _, _, broker, reason = policy
    target = format_destination(_display(host), None if port is None else _display(port))
    report_block("socket.create_connection", target, policy)
    raise NetworkBlockedError(blocked_message(target, broker, reason), target, broker)
