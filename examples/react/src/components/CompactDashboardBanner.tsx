import { useStravaTokens } from '../useStravaTokens'
import { STATUS_TEXT, StatusPill } from './StatusPill'

/** One line for the page header: the status pill, and a link when the user has to act. */
export function CompactDashboardBanner() {
  const { status, needsReauth, reconnect } = useStravaTokens()
  const connect = status === 'not_connected'
  return (
    <div className="compact" data-testid="compact-banner" data-status={status} role="status">
      <StatusPill status={status} testId="compact-status" />
      <span className="compact-text">{STATUS_TEXT[status]}</span>
      {(connect || needsReauth) && (
        <button
          type="button"
          className="link"
          data-testid={connect ? 'compact-connect-link' : 'compact-reconnect-link'}
          onClick={() => void reconnect()}
        >
          {connect ? 'Connect' : 'Reconnect'}
        </button>
      )}
    </div>
  )
}
