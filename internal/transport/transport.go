// Package transport tells failures of the way to a server (a broker, a
// database) from failures of what was sent: the first are marked
// tailrace.Unavailable by the publishers of the bus and by the Transaction
// behavior, so that an outage costs no message an attempt.
package transport

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tailrace/tailrace"
)

// Network reports whether err is a failure of the network path to a
// server: a dial that failed or timed out, a connection refused, reset or
// cut short, an I/O timeout.
func Network(err error) bool {
	if err == nil {
		return false
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	for _, target := range []error{io.EOF, io.ErrUnexpectedEOF, net.ErrClosed, context.DeadlineExceeded,
		syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.ECONNABORTED, syscall.EPIPE,
		syscall.EHOSTUNREACH, syscall.ENETUNREACH, syscall.ETIMEDOUT} {
		if errors.Is(err, target) {
			return true
		}
	}
	return false
}

// Mark returns err marked with tailrace.Unavailable when down(err) or
// Network(err) says it is a transport failure, and err unchanged
// otherwise.
func Mark(err error, down func(error) bool) error {
	if err == nil || tailrace.IsUnavailable(err) {
		return err
	}
	if Network(err) || (down != nil && down(err)) {
		return tailrace.Unavailable(err)
	}
	return err
}

// SQL reports whether err is a failure of the connection to a database
// rather than of the statement: a broken or refused connection, a
// PostgreSQL SQLSTATE of class 08 (connection exception) or 53
// (insufficient resources), a server shutting down or not accepting
// connections yet (57P01–57P03), a network failure.
func SQL(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, driver.ErrBadConn) || errors.Is(err, sql.ErrConnDone) || errors.Is(err, mysql.ErrInvalidConn) || pgconn.Timeout(err) {
		return true
	}
	var ce *pgconn.ConnectError
	if errors.As(err, &ce) {
		return true
	}
	var st interface{ SQLState() string }
	if errors.As(err, &st) {
		code := st.SQLState()
		switch {
		case strings.HasPrefix(code, "08"), // connection exception
			strings.HasPrefix(code, "53"),                     // insufficient resources
			code == "57P01", code == "57P02", code == "57P03": // shutting down, cannot connect now
			return true
		}
		return false
	}
	return Network(err)
}
