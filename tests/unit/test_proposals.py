"""Draft resources that suggestions propose (app.cds.proposals): a MedicationRequest the clinician signs."""

from fhir.resources.R4B.medicationrequest import MedicationRequest

from app.cds.proposals import Frequency, ProposedMedication, Route, medication_proposal, suggest_creating

ATORVASTATIN_20 = ProposedMedication(rxnorm="617310", display="atorvastatin 20 MG Oral Tablet", dose=20)


def test_a_medication_proposal_is_a_valid_draft_proposal_for_the_patient():
    resource = medication_proposal("p1", ATORVASTATIN_20, "10-year risk 8.0 %")
    MedicationRequest.model_validate(resource)  # valid R4
    assert (resource["status"], resource["intent"]) == ("draft", "proposal")
    assert resource["subject"] == {"reference": "Patient/p1"}
    assert resource["medicationCodeableConcept"] == {
        "coding": [
            {
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                "code": "617310",
                "display": ATORVASTATIN_20.display,
            }
        ],
        "text": ATORVASTATIN_20.display,
    }
    assert resource["reasonCode"] == [{"text": "10-year risk 8.0 %"}]


def test_the_dosage_says_dose_route_and_frequency_in_words_and_in_codes():
    [dosage] = medication_proposal("p1", ATORVASTATIN_20, "why")["dosageInstruction"]
    assert dosage == {
        "text": "20 mg by mouth once daily",
        "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
        "route": {"coding": [{"system": "http://snomed.info/sct", "code": "26643006", "display": "Oral route"}]},
        "doseAndRate": [
            {"doseQuantity": {"value": 20, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}
        ],
    }


def test_fractional_doses_other_routes_and_frequencies_are_written_as_given():
    sublingual = Route("37839007", "Sublingual route", "under the tongue")
    twice_daily = Frequency(2, 1, "d", "twice daily")
    drug = ProposedMedication("197606", "digoxin 0.125 MG Oral Tablet", 0.125, "mg", sublingual, twice_daily)
    resource = medication_proposal("p2", drug, "why")
    MedicationRequest.model_validate(resource)
    [dosage] = resource["dosageInstruction"]
    assert dosage["text"] == "0.125 mg under the tongue twice daily"
    assert dosage["timing"] == {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d"}}
    assert dosage["route"]["coding"][0]["code"] == "37839007"
    assert dosage["doseAndRate"][0]["doseQuantity"]["value"] == 0.125


def test_suggest_creating_wraps_the_draft_in_one_create_action():
    resource = medication_proposal("p1", ATORVASTATIN_20, "why")
    suggestion = suggest_creating("Propose a statin", "Create a draft", resource)
    assert suggestion.isRecommended is True and suggestion.uuid
    [action] = suggestion.actions
    assert (action.type, action.description, action.resource) == ("create", "Create a draft", resource)
    assert suggest_creating("l", "d", resource, recommended=False).isRecommended is False
