package redisstream

import "time"

// SetConsumerHousekeeping shortens the idle-member housekeeping for a test
// and returns a function restoring it.
func SetConsumerHousekeeping(interval, timeout time.Duration) (restore func()) {
	i, t := checkConsumersInterval, consumerTimeout
	checkConsumersInterval, consumerTimeout = interval, timeout
	return func() { checkConsumersInterval, consumerTimeout = i, t }
}
