package outbox

import (
	"context"
	"database/sql"
)

// complete deletes a command's row in the handler's transaction tx if it is
// still claimed with token; ErrNotClaimed if it is not.
func (q *relaySQL) complete(ctx context.Context, tx *sql.Tx, id, token int64) error {
	res, err := tx.ExecContext(ctx, `DELETE FROM `+q.t+` WHERE id = `+q.ph(1)+` AND claim_token = `+q.ph(2), id, token)
	if err != nil {
		return err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n != 1 {
		return ErrNotClaimed
	}
	return nil
}
