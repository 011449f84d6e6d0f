"""The customers' logins (ODMR, RFC 2645): who may log in, and the secrets to check them.

The objects are in ``model``, the passwords' secrets and their checking
(pure) in ``passwords``, the root-only file in ``store``.  The config names
which logins may take which domain's mail (``[domains.X] users``); this
package knows only the logins themselves.
"""

from flushctl.logins.model import Login, Logins, LoginsError
from flushctl.logins.passwords import check_password, verify_cram_md5, verify_plain
from flushctl.logins.store import add_user, delete_user, load, set_password

__all__ = [
    "Login", "Logins", "LoginsError",
    "add_user", "check_password", "delete_user", "load", "set_password",
    "verify_cram_md5", "verify_plain",
]
