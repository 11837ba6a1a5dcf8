"""Validates medfleet's clinical output with parsers medfleet did not write.

    validate.py fhir BUNDLE.json...   every file must be a FHIR R4 transaction Bundle of vital-signs Observations
    validate.py hl7 MESSAGE.hl7...    every file must be an HL7 v2 ORU^R01 (IHE PCD-01)

Prints one JSON object per line with the fields the Rust test asserts on; exits non-zero on the first invalid
input, naming it and why.
"""

import json
import sys

VITAL_SIGNS = "http://terminology.hl7.org/CodeSystem/observation-category"
LOINC = "http://loinc.org"
MDC = "urn:iso:std:iso:11073:10101"
UCUM = "http://unitsofmeasure.org"


def fail(path, why):
    print(f"{path}: {why}", file=sys.stderr)
    sys.exit(1)


def check_fhir(path):
    from fhir.resources.bundle import Bundle
    from fhir.resources.observation import Observation

    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    bundle = Bundle.parse_obj(raw)
    if bundle.type != "transaction":
        fail(path, f"bundle type {bundle.type}")
    for entry in bundle.entry or []:
        obs = Observation.parse_obj(entry.resource.dict())
        categories = [c.code for cat in obs.category or [] for c in cat.coding or [] if c.system == VITAL_SIGNS]
        if "vital-signs" not in categories:
            fail(path, "an Observation lacks the vital-signs category")
        systems = [c.system for c in obs.code.coding]
        if systems[:1] != [LOINC] or MDC not in systems:
            fail(path, f"code systems {systems}: LOINC first and MDC expected")
        quantities = [obs.valueQuantity] if obs.valueQuantity else [c.valueQuantity for c in obs.component or []]
        if not quantities or any(q is None or q.system != UCUM or not q.code for q in quantities):
            fail(path, "every value must be a UCUM quantity")
        if obs.subject is None or obs.subject.identifier is None or obs.effectiveDateTime is None:
            fail(path, "subject and effectiveDateTime are required")
        request = entry.request
        print(json.dumps({
            "identifier": obs.identifier[0].value,
            "status": obs.status,
            "loinc": obs.code.coding[0].code,
            "components": [c.code.coding[0].code for c in obs.component or []],
            "patient": obs.subject.identifier.value,
            "method": request.method,
            "if_none_exist": request.ifNoneExist,
        }))


def check_hl7(path):
    import hl7

    # newline="" keeps the \r segment terminators (text mode would turn them into \n).
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    message = hl7.parse(text)
    msh = message.segment("MSH")
    if str(msh[9]) != "ORU^R01^ORU_R01" or str(msh[12]) != "2.6":
        fail(path, f"MSH-9 {msh[9]} / MSH-12 {msh[12]}")
    obr = message.segment("OBR")
    metrics = []
    containers = 0
    for obx in message.segments("OBX"):
        if str(obx[11]) == "X":
            containers += 1
            continue
        metrics.append({
            "type": str(obx[2]),
            "code": str(obx[3][0][0]),
            "refid": str(obx[3][0][1]),
            "sub_id": str(obx[4]),
            "value": str(obx[5]),
            "unit": str(obx[6][0][0]),
            "status": str(obx[11]),
            "time": str(obx[14]),
            "equipment": str(obx[18][0][0]),
        })
    print(json.dumps({
        "control_id": str(msh[10]),
        "profile": str(msh[21]),
        "patient": str(message.segment("PID")[3][0][0]),
        "authority": str(message.segment("PID")[3][0][3]),
        "location": str(message.segment("PV1")[3]),
        "filler": str(obr[3][0][0]),
        "service": str(obr[4]),
        "containers": containers,
        "metrics": metrics,
    }))


def main():
    kind, paths = sys.argv[1], sys.argv[2:]
    for path in paths:
        {"fhir": check_fhir, "hl7": check_hl7}[kind](path)


if __name__ == "__main__":
    main()
