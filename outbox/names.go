package outbox

import (
	"errors"
	"fmt"
)

// MaxTableNameLen is the longest outbox table name accepted. Every object
// tailrace derives from the name (the dead-letter, lease and relay tables, the
// indexes, the PostgreSQL notify function) adds at most 8 bytes, and
// PostgreSQL keeps only 63 bytes of an identifier (MySQL 64): a longer name
// would be silently truncated and two long names could map to one table.
const MaxTableNameLen = 48

// ErrInvalidName is returned, wrapped in a message naming the bad value, for
// an outbox table name that could inject SQL, that a database would fold or
// truncate onto another name, or that is empty.
var ErrInvalidName = errors.New("outbox: invalid table name")

// ValidateTableName reports whether name can be used as an outbox table name.
// It is checked before any SQL is built from it. A valid name is 1 to
// MaxTableNameLen bytes of lower-case ASCII letters, digits and underscores,
// starting with a letter or underscore. Upper case is rejected rather than
// folded, so that the name → table mapping is one-to-one on every database
// (PostgreSQL folds unquoted identifiers to lower case, MySQL on Linux does
// not).
func ValidateTableName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: the name is empty", ErrInvalidName)
	}
	if len(name) > MaxTableNameLen {
		return fmt.Errorf("%w: %q is %d bytes, the limit is %d (PostgreSQL truncates identifiers at 63 bytes and derived names add up to 8)",
			ErrInvalidName, name, len(name), MaxTableNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c == '_':
		case c >= '0' && c <= '9' && i > 0:
		default:
			return fmt.Errorf("%w: %q has %q at byte %d; use lower-case letters, digits and underscores, starting with a letter or underscore",
				ErrInvalidName, name, c, i)
		}
	}
	return nil
}
