"""API tokens: a user's, or a node agent's (bound to one node name, no user).

Tokens are 256-bit random strings shown once; only their SHA-256 is stored
(a fast hash is right for high-entropy secrets: there is nothing to brute-force).
`last_used` is written at most once a minute per token, so reading with a
token does not turn every request into a database write.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from rain.catalog.db import Database, as_utc
from rain.catalog.schema import TokenRow, UserRow
from rain.catalog.users import check_name, user_model
from rain.model import ApiToken, InvalidRequest, NotFound, User
from rain.model.clock import utcnow

TOKEN_PREFIX = "rain_"
LAST_USED_EVERY = timedelta(seconds=60)
MAX_LABEL = 128


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def node_principal(node: str) -> User:
    """Who a node token's requests come from: node `node`, not a user (id 0 is no row)."""
    return User(0, f"node:{node}", node=node)


def _model(row: TokenRow, user: str | None) -> ApiToken:
    created = as_utc(row.created)
    assert created is not None
    return ApiToken(row.id, row.label, created, as_utc(row.last_used), user=user, node=row.node)


def _check_label(label: str) -> str:
    if len(label) > MAX_LABEL or not label.isprintable():
        raise InvalidRequest(f"bad token label: use at most {MAX_LABEL} printable characters")
    return label


class TokenCatalog:
    db: Database

    if TYPE_CHECKING:  # provided by UserCatalog
        @staticmethod
        def _user_row(s: Session, name: str) -> UserRow: ...

    def issue_token(self, user: str, label: str = "") -> str:
        return self.create_token(user=user, label=label)[1]

    def create_token(self, *, user: str | None = None, node: str | None = None,
                     label: str = "") -> tuple[ApiToken, str]:
        """A new token for `user`, or a node token for node `node`: (its record, secret)."""
        if (user is None) == (node is None):
            raise InvalidRequest("a token belongs to exactly one user or one node")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.db.session() as s:
            uid = None if user is None else self._user_row(s, user).id
            row = TokenRow(user_id=uid, node=None if node is None else check_name("node", node),
                           token_hash=hash_token(token), label=_check_label(label),
                           created=utcnow())
            s.add(row)
            s.flush()
            return _model(row, user), token

    def user_for_token(self, token: str) -> User | None:
        """The token's user (a disabled one too: the caller refuses it), the node principal
        of a node token, or None for no live token."""
        with self.db.session() as s:
            found = s.execute(
                select(TokenRow, UserRow).outerjoin(UserRow, TokenRow.user_id == UserRow.id)
                .where(TokenRow.token_hash == hash_token(token))).first()
            if found is None:
                return None
            row, user = found
            now = utcnow()
            last = as_utc(row.last_used)
            if last is None or now - last >= LAST_USED_EVERY:
                row.last_used = now
            if row.node is not None:
                return node_principal(row.node)
            if user is None or user.deleted is not None:
                return None
            return user_model(user)

    def list_tokens(self, *, user: str | None = None, node: str | None = None,
                    everyone: bool = False) -> list[ApiToken]:
        """`user`'s tokens, node `node`'s, or (`everyone`) all of them; oldest first."""
        with self.db.session() as s:
            stmt = (select(TokenRow, UserRow.name)
                    .outerjoin(UserRow, TokenRow.user_id == UserRow.id).order_by(TokenRow.id))
            if user is not None:
                stmt = stmt.where(TokenRow.user_id == self._user_row(s, user).id)
            elif node is not None:
                stmt = stmt.where(TokenRow.node == node)
            elif not everyone:
                raise InvalidRequest("list the tokens of a user, of a node, or everyone's")
            return [_model(row, name) for row, name in s.execute(stmt)]

    def get_token(self, token_id: int) -> ApiToken:
        with self.db.session() as s:
            return _model(*self._token_row(s, token_id))

    def revoke_token(self, token_id: int) -> ApiToken:
        """Delete the token: the next request with it is a 401."""
        with self.db.session() as s:
            row, user = self._token_row(s, token_id)
            s.delete(row)
            return _model(row, user)

    @staticmethod
    def _token_row(s: Session, token_id: int) -> tuple[TokenRow, str | None]:
        found = s.execute(select(TokenRow, UserRow.name)
                          .outerjoin(UserRow, TokenRow.user_id == UserRow.id)
                          .where(TokenRow.id == token_id)).first()
        if found is None:
            raise NotFound(f"no token {token_id}")
        return found[0], found[1]
